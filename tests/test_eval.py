"""The evaluation command on cases whose answer is known."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from conftest import SHARED

from convert import sweep as sweep_module
from convert.sweep import main as sweep_main
from mlx_deepseek.eval import main as eval_main
from mlx_deepseek.eval import evaluate

TINYSEEK = SHARED / "models" / "tinyseek-py"
VAL = str(TINYSEEK / "validation" / "val_ids.npy")


def test_a_model_against_itself_has_no_divergence():
    r = evaluate(TINYSEEK, TINYSEEK, VAL, window=128, limit=4, batch=2, progress=False)
    assert r["kl_mean"] == pytest.approx(0.0, abs=1e-6) and r["top1_agreement"] == 1.0 and r["greedy_flips"] == 0.0
    assert 1 < r["perplexity"] < 100 and r["tokens"] == 4 * 128
    assert r["bits_per_weight"] == pytest.approx(32.0)  # float32 weights, the MTP layer left out


def test_a_uniform_model_has_the_vocabulary_size_as_perplexity(checkpoint, tmp_path):
    folder = tmp_path / "uniform"
    shutil.copytree(checkpoint("v3"), folder)
    weights = dict(mx.load(str(folder / "model.safetensors")))
    weights["lm_head.weight"] = mx.zeros_like(weights["lm_head.weight"])  # every logit 0
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    r = evaluate(folder, None, "some text " * 40, window=32, limit=None, batch=4, progress=False)
    assert r["perplexity"] == pytest.approx(160, rel=1e-5)


def test_a_quantized_cache_is_measured_against_the_plain_one():
    r = evaluate(TINYSEEK, None, VAL, window=128, limit=4, batch=2, kv_bits=8, kv_group_size=32, progress=False)
    assert 0 < r["kl_mean"] < 0.01 and r["top1_agreement"] > 0.95
    by_context = r["kl_by_context"]  # positions 1-64 and 65-128 of each window, equal shares
    assert list(by_context) == ["1-64", "65-128"]
    assert (by_context["1-64"] + by_context["65-128"]) / 2 == pytest.approx(r["kl_mean"], rel=1e-6)


def test_different_vocabularies_are_refused(checkpoint, capsys):
    assert eval_main(["--model", str(TINYSEEK), "--reference", str(checkpoint("v3")), "--data", VAL]) == 1
    assert "cannot be compared token by token" in capsys.readouterr().err


def test_bad_data_is_refused(tmp_path, capsys):
    (tmp_path / "ids.npy").write_bytes(b"not numpy")
    assert eval_main(["--model", str(TINYSEEK), "--data", str(tmp_path / "ids.npy")]) == 1
    assert "not a readable .npy" in capsys.readouterr().err
    assert eval_main(["--model", str(TINYSEEK), "--data", "too short"]) == 1
    assert "shorter than one window" in capsys.readouterr().err


def test_sweep_writes_a_table_csv_and_plot_and_resumes(tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    calibration = tmp_path / "calibration.npy"
    np.save(calibration, np.load(VAL)[-4000:])  # not the evaluated text
    assert sweep_main([str(TINYSEEK), "--recipes", "8;3;3+usage:2,4", "--out", str(out), "--data", VAL,
                      "--calibration", str(calibration), "--window", "128", "--windows", "4",
                      "--json", str(tmp_path / "r.json")]) == 0
    rows = json.loads((tmp_path / "r.json").read_text())
    assert [r["recipe"] for r in rows] == ["8", "3", "3+usage:2,4"]
    assert rows[0]["kl_mean"] < rows[1]["kl_mean"] and rows[0]["bits_per_weight"] > rows[1]["bits_per_weight"]
    # expert-aware at the 3-bit budget: no larger than uniform 3-bit, its choice kept beside the weights
    assert rows[2]["bits_per_weight"] <= rows[1]["bits_per_weight"] + 1e-9
    assert json.loads((out / "3+usage_2+4/expert_usage.json").read_text())["expert_widths"] == [2, 4]
    assert (out / "sweep.md").exists() and (out / "sweep.csv").exists() and (out / "sweep.png").exists()

    # run again (as after an interruption): nothing is converted or evaluated twice
    monkeypatch.setattr(sweep_module, "evaluate", lambda *a, **k: pytest.fail("evaluated again"))
    assert sweep_main([str(TINYSEEK), "--recipes", "8;3;3+usage:2,4", "--out", str(out), "--data", VAL,
                      "--calibration", str(calibration), "--window", "128", "--windows", "4",
                      "--json", str(tmp_path / "again.json")]) == 0
    assert json.loads((tmp_path / "again.json").read_text()) == rows
