"""The fused kernels against their torch references: every op of kernels.py, over odd shapes, ranges and dtypes.

The Triton kernels run here under Triton's interpreter (on the CPU, on CPU tensors), and
on a GPU where there is one (the `gpu` cases, through torch.ops.ds_topkast, which is what
the layer calls). The references are plain torch (kernels.REFERENCES); they are checked
against an independent stable sort and index arithmetic in test_layers.py and
test_select.py. Equality is exact: every op only moves, masks or counts values, except
the gradient's gather, whose regulariser term is one fp32 multiply-add.
"""
from __future__ import annotations

import pytest
import torch

from ds_topkast.core.bitmaps import BLOCK_BITS, block_counts, pack_bits, unpack_bits
from ds_topkast.core.kernels import REFERENCES

pytest.importorskip("triton")

# (entries, density of B): odd sizes, a layer smaller than a byte, exactly and just past a block, several blocks.
SETS = [(1, 1.0), (7, 0.5), (BLOCK_BITS - 1, 0.3), (BLOCK_BITS, 0.01), (BLOCK_BITS + 1, 0.9), (5 * BLOCK_BITS + 13, 0.2),
        (3001, 0.0)]
# (start, length) as fractions of the entries: the whole layer, a shard starting mid-byte, one inside a block.
RANGES = [(0.0, 1.0), (0.37, 0.5), (0.9, 0.1)]


def where_params():
    return [pytest.param("interpreter"), pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture
def device(where):
    if where == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return "cuda" if where == "cuda" else "cpu"


@pytest.fixture
def ops(where, device):
    """The ops to test: on the CPU the Triton launchers running their kernels in Triton's interpreter (set up by
    conftest.py); on CUDA the registered ops, which is what the layer calls (Triton)."""
    if where == "cuda":
        return {name: getattr(torch.ops.ds_topkast, name) for name in REFERENCES}
    import triton

    if not triton.knobs.runtime.interpret:
        pytest.skip("Triton's interpreter is off (TRITON_INTERPRET is set by conftest.py on the CPU accelerator only)")
    from ds_topkast.core.triton_kernels import LAUNCHERS

    return LAUNCHERS


def random_set(numel: int, density: float, seed: int):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(numel, generator=gen) < density
    bits = pack_bits(mask)
    return mask, bits, block_counts(bits, numel), int(mask.sum()), gen


def span(numel: int, fractions: tuple[float, float]) -> tuple[int, int]:
    start = min(numel - 1, int(fractions[0] * numel)) if numel > 1 else 0
    return start, max(1, min(numel - start, int(fractions[1] * numel)))


def on(device, *tensors):
    return [None if t is None else t.to(device) for t in tensors]


@pytest.mark.parametrize("where", where_params())
@pytest.mark.parametrize("numel,density", SETS)
@pytest.mark.parametrize("fractions", RANGES)
@pytest.mark.parametrize("value_dtype,out_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                                   (torch.bfloat16, torch.bfloat16)])
def test_expand_and_scatter_match_the_reference(where, device, ops, numel, density, fractions, value_dtype,
                                                out_dtype):
    mask, bits, counts, members, gen = random_set(numel, density, numel)
    values = torch.randn(members, generator=gen).to(value_dtype)
    forward = pack_bits(torch.rand(members, generator=gen) < 0.5)
    start, length = span(numel, fractions)
    for forward_bits in (None, forward):
        expected = REFERENCES["expand_bits"](values, bits, counts, forward_bits, start, length, out_dtype)
        got = ops["expand_bits"](*on(device, values, bits, counts, forward_bits), start, length, out_dtype)
        assert got.dtype == out_dtype and torch.equal(got.cpu(), expected)
        into = torch.full((length,), float("nan"), dtype=out_dtype, device=device)  # every entry must be written
        ops["expand_bits_into_"](into, *on(device, values, bits, counts, forward_bits), start)
        assert torch.equal(into.cpu(), expected)
    target = torch.randn(length, generator=gen).to(out_dtype)
    expected = target.clone()
    REFERENCES["scatter_bits_"](expected, values, bits, counts, start)
    got = target.to(device)
    ops["scatter_bits_"](got, *on(device, values, bits, counts), start)
    assert torch.equal(got.cpu(), expected)


@pytest.mark.parametrize("where", where_params())
@pytest.mark.parametrize("numel,density", SETS)
@pytest.mark.parametrize("fractions", RANGES)
@pytest.mark.parametrize("straight_through,l2_scale", [(True, 0.0), (False, 0.0), (True, 0.25), (False, 0.25)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_matches_the_reference(where, device, ops, numel, density, fractions, straight_through,
                                      l2_scale, dtype):
    mask, bits, counts, members, gen = random_set(numel, density, numel + 1)
    values = torch.randn(members, generator=gen).to(dtype)
    forward = pack_bits(torch.rand(members, generator=gen) < 0.3)
    start, length = span(numel, fractions)
    dense = torch.randn(length, generator=gen).to(dtype)
    expected = torch.full((members,), 7.0)  # members outside the range keep what was there
    got = expected.to(dtype).to(device)
    REFERENCES["gather_bits_"](expected, dense, bits, counts, start, forward, values, l2_scale, 4.0, straight_through)
    ops["gather_bits_"](got, *on(device, dense, bits, counts), start, *on(device, forward, values), l2_scale, 4.0,
                        straight_through)
    assert torch.equal(got.cpu(), rounded(expected, dtype, where))


def rounded(fp32: torch.Tensor, dtype: torch.dtype, where: str) -> torch.Tensor:
    """The kernel's fp32 result as it stores it in `dtype`: rounded to nearest even on a GPU, truncated by Triton's
    interpreter (which converts fp32 to bf16 by dropping the low 16 bits)."""
    if dtype == torch.bfloat16 and where == "interpreter":
        return (fp32.view(torch.int32) & ~0xFFFF).view(torch.float32).to(dtype)
    return fp32.to(dtype)


@pytest.mark.parametrize("where", where_params())
@pytest.mark.parametrize("numel,density", SETS)
def test_remap_matches_the_reference(where, device, ops, numel, density):
    _, old_bits, old_counts, _, _ = random_set(numel, density, 3)
    _, new_bits, new_counts, members, _ = random_set(numel, density, 4)
    expected = REFERENCES["remap_positions"](old_bits, old_counts, new_bits, new_counts, numel, members)
    got = ops["remap_positions"](*on(device, old_bits, old_counts, new_bits, new_counts), numel, members)
    assert torch.equal(got.cpu(), expected)


def radix_case(seed: int):
    """Three segments over one source, held by two ranks: segment 1 in two pieces (rank 1's starting mid-byte in the
    output), the others on rank 0; many ties (a few distinct magnitudes, both signs). A row's candidate bits are
    its source entries' own."""
    gen = torch.Generator().manual_seed(seed)
    source = (torch.randint(-6, 7, (9000,), generator=gen).float() / 2)
    source[:3000] = torch.randn(3000, generator=gen)
    ranks = [[0, 3000, 0, 0, 0, 0,  # segment 0: 3000 entries, output bits from 0
              3000, 1237, 1, 0, 3000, 3008,  # segment 1: its entries 0..1236, output from bit 3008
              8237, 5, 2, 0, 8237, 8248],  # segment 2: five entries
             [4237, 4000, 1, 1237, 4237, 3008 + 1237]]  # rank 1: segment 1's entries 1237..5236
    candidates = pack_bits(torch.rand(9000, generator=gen) < 0.8)
    return source, ranks, candidates


def radix_select(impl, source, ranks, k, candidates, key_positions):
    """The distributed radix select with the ranks in one process: histograms summed, bitmaps summed."""
    from ds_topkast.core.select import digit_widths

    prefix, remaining = torch.zeros_like(k), k
    shift = 31 + key_positions
    for width in digit_widths(31 + key_positions):
        shift -= width
        histogram = torch.zeros(3, 1 << width, dtype=torch.int32, device=k.device)
        for rows in ranks:
            part = torch.zeros_like(histogram)
            impl["radix_histogram_"](part, source, rows, prefix, candidates, key_positions, shift, width)
            histogram += part
        prefix, remaining = impl["radix_step"](histogram, prefix, remaining, width)
    out = torch.zeros(1100, dtype=torch.uint8, device=k.device)
    for rows in ranks:
        mine = torch.zeros_like(out)
        impl["radix_select_bits_"](mine, source, rows, prefix, k, candidates, key_positions)
        out += mine
    return out.cpu()


@pytest.mark.parametrize("where", where_params())
@pytest.mark.parametrize("with_candidates", [False, True])
@pytest.mark.parametrize("ks", [[1, 1, 1], [1500, 2000, 5], [0, 1, 3], [2000, 3500, 2]])
def test_radix_select_matches_the_reference_and_a_stable_sort(where, device, ops, with_candidates, ks):
    source, ranks, candidates = radix_case(0)
    candidates = candidates if with_candidates else None
    if with_candidates:
        ks = [min(k, 3 * k // 4) for k in ks]  # at most the candidates of each segment
    k = torch.tensor(ks)
    expected_bits = radix_select(REFERENCES, source, ranks, k, candidates, 13)
    assert torch.equal(radix_select(ops, *on(device, source), ranks, *on(device, k, candidates), 13), expected_bits)
    chosen = unpack_bits(expected_bits, 8800)
    scores = source.abs()
    if candidates is not None:
        scores = torch.where(unpack_bits(candidates, 9000), scores, -1.0)
    for segment, (first, length, out) in enumerate([(0, 3000, 0), (3000, 5237, 3008), (8237, 5, 8248)]):
        expected = torch.zeros(length, dtype=torch.bool)
        expected[torch.sort(-scores[first:first + length], stable=True).indices[:ks[segment]]] = True
        assert torch.equal(chosen[out:out + length], expected), segment


@pytest.mark.parametrize("where", where_params())
def test_radix_select_bits_ors_into_bytes_rows_share_and_bits_already_set(where, device, ops):
    """Rows whose outputs share a byte, an empty row starting mid-byte, and an output with bits already set: every
    row's chosen bits are OR-ed in, nothing else changes."""
    source = torch.randn(40, generator=torch.Generator().manual_seed(5))
    rows = [0, 5, 0, 0, 0, 0,  # output bits 0-4
            5, 15, 1, 0, 0, 5,  # bits 5-19: shares byte 0 with the row before
            20, 0, 2, 0, 0, 37,  # empty, mid-byte
            20, 20, 2, 0, 0, 43]  # bits 43-62
    everything, one = torch.zeros(3, dtype=torch.int64), torch.ones(3, dtype=torch.int64)  # threshold 0: all chosen
    for fill in (0x00, 0xA5):
        expected = torch.full((8,), fill, dtype=torch.uint8)
        got = expected.to(device)
        REFERENCES["radix_select_bits_"](expected, source, rows, everything, one, None, 6)
        ops["radix_select_bits_"](got, *on(device, source), rows, *on(device, everything, one), None, 6)
        assert torch.equal(got.cpu(), expected), (got.cpu(), expected)


def test_the_layer_calls_triton_on_cuda_and_the_reference_elsewhere():
    """The ops are registered for CUDA (Triton) and for every other device (the torch reference)."""
    for name in REFERENCES:
        op = getattr(torch.ops.ds_topkast, name).default.name()
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CompositeExplicitAutograd"), name
