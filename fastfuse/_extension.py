"""Placeholder loader until the compiled build lands (replaced by the build work)."""
def load():
    return False, "compiled extension not built yet"
def built_with_cuda():
    return False
def build_info():
    return {}
