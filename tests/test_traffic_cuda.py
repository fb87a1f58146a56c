"""The traffic model of the CUDA launches (fastfuse/bench/traffic_cuda.py): its DRAM ratios at
the issue's shapes (a), (b), (c) on H100- and A100-class GPUs, the path it models against
attentive_pool's own decision, and its token reads against the bytes the kernels really load
(the CUDA emulation counts every token load of csrc/cuda/pool_tiles.cuh)."""
import pytest
import torch

from fastfuse import _extension
from fastfuse.bench import traffic, traffic_cuda

from test_cuda_emulated import Case, run_case, runner  # noqa: F401  (runner: the emulator fixture)

pytestmark = pytest.mark.skipif(not _extension.load()[0],
                                reason=f"the CUDA planner lives in the compiled library: {_extension.load()[1]}")
GPUS = [pytest.param(traffic.H100, id="h100"), pytest.param(traffic.A100, id="a100")]
SHAPE_IDS = ["a", "b", "c"]


@pytest.mark.parametrize("gpu", GPUS)
@pytest.mark.parametrize("index", [0, 1, 2], ids=SHAPE_IDS)
def test_forward_ratio(index, gpu):
    result = traffic_cuda.forward_traffic(traffic.SHAPES[index], gpu)
    assert result.ratio <= 1.25, result


@pytest.mark.parametrize("gpu", GPUS)
@pytest.mark.parametrize("index", [0, 1, 2], ids=SHAPE_IDS)
def test_backward_ratio(index, gpu):
    for layers_need_grad in (False, True):
        result = traffic_cuda.backward_traffic(traffic.SHAPES[index], gpu, layers_need_grad=layers_need_grad)
        assert result.ratio <= 1.5, (layers_need_grad, result)


def test_many_heads_are_tiled_and_skip_z_in_the_frozen_backward():
    """Shape (b), 192 heads: the dw-only backward tiles the heads (dw in shared memory, not
    ~590 KB of global partials per block) and holds all 24 tokens in one tile (z not read)."""
    result = traffic_cuda.backward_traffic(traffic.SHAPES[1], traffic.H100)
    tile, _, head_tile = result.config
    assert head_tile < 192 and tile >= 24
    assert result.global_bytes["dw partial"] == [0, 0]
    assert result.global_bytes["pooled"] == [0, 0]


def test_the_modelled_path_is_attentive_pools():
    """gathers_first restates ops._gather_first (frozen training, a gathered spec, a one-pass
    PyTorch average: gather.reads_rows_once on a CUDA device); forward_launches restates
    fused_pool_cuda.cu (the gather pass before a forward whose heads are tiled)."""
    from fastfuse import gather

    for shape in traffic.SHAPES:
        dtype = traffic_cuda._dtype(shape.itemsize)
        one_pass = gather.reads_rows_once(dtype, torch.float32, torch.device("cuda"))
        assert traffic_cuda.gathers_first(shape, training=True) == (one_pass and shape.tokens != "all")
    assert traffic_cuda.gathers_first(traffic.SHAPES[0], training=True)       # frozen training
    assert not traffic_cuda.gathers_first(traffic.SHAPES[0], training=False)  # inference: in the kernels
    assert not traffic_cuda.gathers_first(traffic.SHAPES[2], training=True)   # "all": nothing to gather
    kernels = [[launch.kernel for launch in traffic_cuda.forward_launches(shape)] for shape in traffic.SHAPES]
    assert kernels == [["forward"], ["gather", "forward (on the stack)"], ["forward"]]  # (b): 192 heads, tiled


# A made-up GPU whose 12,000 bytes of shared memory per block force head tiles at D=64, H=40
# (as in tests/test_cuda_emulated.py), and the sm_90 limits.
TIGHT = traffic.Gpu("tight", 1, 2**20, 12000, 2 * (12000 + 1024))


@pytest.mark.parametrize("gpu, tokens, need_grad", [
    pytest.param(TIGHT, "cls+ap", False, id="tight-cls+ap-dw-only"),
    pytest.param(TIGHT, "all", True, id="tight-all-grads"),
    pytest.param(traffic.H100, "cls+ap", True, id="h100-cls+ap-grads"),
])
def test_token_reads_match_the_emulated_kernels(runner, gpu, tokens, need_grad, tmp_path):  # noqa: F811
    """The model's token bytes per launch (layers x head tiles) against the loads the kernels
    issue in the CUDA emulation, with the planner's tiles for the same GPU."""
    batch, layers, length, dim, heads = 3, 3, 9, 64, 40
    case = Case(dtype=torch.float32, batch=batch, dim=dim, heads=heads, lengths=(length,) * layers, tokens=tokens,
                need_grad=need_grad, grad_attention=False, backward_blocks=2,
                plan_limits=(gpu.shared_per_block_optin, gpu.shared_per_multiprocessor))
    run_case(runner, case, tmp_path)
    shape = traffic.Shape("emulated", batch, layers, length, dim, heads, tokens, num_prefix_tokens=1, itemsize=4)
    launches = traffic_cuda.forward_launches(shape, gpu)
    backward = traffic_cuda.backward_launch(shape, gpu, layers_need_grad=need_grad)
    tile, head_tile, backward_tile, _, backward_head_tile = case.used_plan
    assert backward.config == (backward_tile, dim, backward_head_tile)
    if len(launches) == 2:  # heads tiled on a gathered spec: the gather pass, then the stack
        gather, forward = launches
        assert tokens != "all" and head_tile < heads
        assert case.token_bytes["gather"] == gather.global_bytes["layers"][0]
        assert case.token_bytes["forward"] == forward.global_bytes["tokens"][0]
    else:
        (forward,) = launches
        assert forward.config == (tile, dim, head_tile)
        assert case.token_bytes["forward"] == forward.global_bytes["layers"][0]
    assert case.token_bytes["backward"] == backward.global_bytes["layers"][0]
    if gpu is TIGHT and tokens == "cls+ap":  # the case is about head tiles: make sure there are some
        assert len(launches) == 2 and backward_head_tile < heads
