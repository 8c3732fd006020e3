"""`castle_convert.bench` and `castle-convert bench`: the measurements are real and checked,
not their speed (speed is a benchmark, never a timed assertion)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import castle_convert as cc
from castle_convert.bench import BenchError, benchmark, count_macs, geometry, mixing_macs
from castle_convert.cli import main
from families import FAMILIES

FAST = dict(repeats=2, min_repeats=1, warmup=1, progress=False)


@pytest.mark.parametrize("fid", ["timm-vit", "timm-reg4-dinov2", "hf-vit", "hf-dinov3", "hf-siglip-vision",
                                 "hf-siglip2-naflex", "timm-naflexvit"])
def test_benchmark_cells_are_measured_and_macs_match_analytic(fid):
    fam = next(f for f in FAMILIES if f.id == fid)
    model = fam.build()
    sizes = [fam.size, fam.size * 2]
    result = benchmark(model, resolutions=sizes, batches=[1, 2], **FAST)
    assert [(c.resolution, c.batch) for c in result.cells] == [(s, b) for s in sizes for b in (1, 2)]
    for c in result.cells:
        grid = c.resolution // fam.patch
        assert c.tokens == grid * grid + fam.prefix_tokens
        assert c.original_ms > 0 and c.castling_ms > 0 and c.repeats >= 1
        assert c.original_spread_ms[0] <= c.original_ms <= c.original_spread_ms[1]
        assert c.original_throughput == pytest.approx(c.batch * 1e3 / c.original_ms)
        assert c.macs_check, (c.original_macs, c.castling_macs, c.mixing_macs_analytic)
        assert c.original_peak_mib is None or c.original_peak_mib > 0
    # MACs scale with the batch; the softmax mixing grows with N², the castling one with N
    one, two = result.cells[0], result.cells[1]
    assert two.original_macs == 2 * one.original_macs
    big = result.cells[2]
    soft_growth = big.mixing_macs_analytic[0] / one.mixing_macs_analytic[0]
    cast_growth = big.mixing_macs_analytic[1] / one.mixing_macs_analytic[1]
    assert soft_growth > 3 * cast_growth / 2 and cast_growth == pytest.approx(big.tokens / one.tokens, rel=0.3)
    d = result.to_dict()
    assert d["cells"][0]["ratio"] == pytest.approx(one.ratio)
    assert "matches the analytic count" in result.format_table()


@pytest.mark.parametrize("kind", sorted(cc.attention.KINDS))
@pytest.mark.parametrize("dw", ["2d", "1d", "none"])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_analytic_mixing_macs_match_the_counter(kind, dw, qk_norm):
    import timm
    model = timm.create_model("test_vit", img_size=32, patch_size=8, num_classes=3, qk_norm=qk_norm).eval()
    conv = cc.finalize(cc.convert(model, kind=kind, dw=dw, gamma_init="one"), force=True)
    x = torch.empty(3, 3, 32, 32, device="meta")
    grid, n = geometry(model, (32, 32))
    soft, cast = mixing_macs(conv, 3, grid)
    counted = count_macs(model.to("meta"), x) - count_macs(conv.to("meta"), x)
    assert counted == soft - cast and n == 17


def test_benchmark_separable_kind():
    fam = FAMILIES[0]
    r = benchmark(fam.build(), kind="separable", resolutions=[fam.size, 2 * fam.size], **FAST)
    assert r.kind == "separable" and all(c.macs_check for c in r.cells)
    assert r.cells[1].macs_ratio < r.cells[0].macs_ratio


def test_benchmark_uses_a_given_converted_model_and_rejects_bad_settings():
    fam = FAMILIES[0]
    model = fam.build()
    conv = cc.finalize(cc.convert(model, dw="none", gamma_init="one"), force=True)
    r = benchmark(model, converted=conv, resolutions=[fam.size], **FAST)
    assert r.cells[0].castling_macs == count_macs(conv, torch.randn(1, 3, fam.size, fam.size))
    with pytest.raises(BenchError, match="dtype"):
        benchmark(model, dtype="int8", **FAST)
    if not torch.cuda.is_available():
        with pytest.raises(BenchError, match="CUDA is not available"):
            benchmark(model, device="cuda", **FAST)


def test_cli_bench_writes_json_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    out, png = tmp_path / "b.json", tmp_path / "b.png"
    r = CliRunner().invoke(main, ["bench", "test_vit", "--resolutions", "32,48", "--batch", "1,2",
                                  "--repeats", "1", "--warmup", "1", "--json", str(out), "--plot", str(png),
                                  "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "ratio" in r.output and "matches the analytic count" in r.output
    data = json.loads(out.read_text())
    assert data["kind"] == "linear_angular" and len(data["cells"]) == 4
    ratios = [c["macs_ratio"] for c in data["cells"] if c["batch"] == 1]
    assert ratios[1] < ratios[0]          # linear mixing pays off as the token count grows
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_bench_errors_are_one_line():
    r = CliRunner().invoke(main, ["bench", "test_vit", "--resolutions", "32,abc"])
    assert r.exit_code == 2 and "positive integers" in r.output
    r = CliRunner().invoke(main, ["bench", "resnet18", "--resolutions", "32", "--no-progress"])
    assert r.exit_code == 1 and "no supported attention" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["bench", "vit_smal_patch16_224", "--resolutions", "32"])
    assert r.exit_code == 1 and "vit_small_patch16_224" in r.output


@pytest.mark.parametrize("fid", ["timm-vit", "hf-dinov2-registers"])
def test_quantize_dynamic_int8_times_both_int8_forms_and_measures_fidelity(fid, tmp_path):
    from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

    from castle_convert.bench import quantize_dynamic_int8
    fam = next(f for f in FAMILIES if f.id == fid)
    model = fam.build()
    q = quantize_dynamic_int8(model)
    assert any(isinstance(m, DynamicQuantizedLinear) for m in q.modules())
    assert not any(isinstance(m, DynamicQuantizedLinear) for m in model.modules())      # a copy
    r = benchmark(model, resolutions=[fam.size, 2 * fam.size], quantize="dynamic-int8", **FAST)
    assert r.quantize == "dynamic-int8" and "fidelity to the fp32 form" in r.format_table()
    for cell in r.cells:
        for name in ("castling", "original"):
            f = cell.fidelity[name]
            assert 0.9 < f["patch_cosine"] < 1.0 and 0.9 < f["cls_cosine"] <= 1.0      # int8 is close, not equal
    with pytest.raises(BenchError, match="--device cpu --dtype float32"):
        benchmark(model, quantize="dynamic-int8", dtype="bfloat16", **FAST)
    with pytest.raises(BenchError, match="not supported"):
        benchmark(model, quantize="static-int4", **FAST)


def test_cli_bench_quantize(tmp_path):
    out = tmp_path / "q.json"
    r = CliRunner().invoke(main, ["bench", "test_vit", "--resolutions", "32", "--repeats", "1", "--warmup", "1",
                                  "--quantize", "dynamic-int8", "--json", str(out), "--no-progress"])
    assert r.exit_code == 0, r.output
    cell = json.loads(out.read_text())["cells"][0]
    assert cell["quantize"] == "dynamic-int8" and set(cell["fidelity"]) == {"castling", "original"}
