"""A new user's findings on a fresh clone (issue 10, second part): each test
fails without its fix. Bad input is refused before any work with one
`error:` line and exit code 2; what a run writes, prints and keeps."""
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch
import yaml

import models as M
from otcompress.cli import main


def run(capsys, *args):
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return e.value.code, out, err


def assert_user_error(code, err, message, out=None):
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], err
    assert "Traceback" not in err
    if out is not None:
        assert not out.exists()
        assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


@pytest.fixture(scope="module")
def z(tmp_path_factory):
    d = tmp_path_factory.mktemp("usability")
    M.vit(seed=1).save_pretrained(d / "anchor")
    M.vit(hidden=48, heads=6, inter=96, seed=2).save_pretrained(d / "wide1")
    M.bert().save_pretrained(d / "bert")  # 32 positions
    M.vit(seed=4).save_pretrained(d / "corrupt")
    w = d / "corrupt" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:200])
    return d


@pytest.fixture
def no_work(monkeypatch):
    """Any weight load or fusion fails the test: refusals must come first."""
    from otcompress import modelio, pipeline

    def boom(*a, **k):
        raise AssertionError("bad input must be refused before any work")
    monkeypatch.setattr(modelio, "load_model", boom)
    monkeypatch.setattr(pipeline, "run", boom)


@pytest.fixture(scope="module")
def fused(z, tmp_path_factory):
    """One real fuse run into missing parent directories, under umask 027,
    with --max-iter; returns (out, JSON result, stderr)."""
    out = tmp_path_factory.mktemp("fused") / "new" / "deeper" / "fused"
    old = os.umask(0o027)
    so, se = io.StringIO(), io.StringIO()
    try:
        with pytest.raises(SystemExit) as e:
            with redirect_stdout(so), redirect_stderr(se):
                main(["fuse", "--anchor", str(z / "anchor"), "--parents", str(z / "wide1"), "--out", str(out),
                      "--alignment", "weights", "--max-iter", "777", "--json"])
    finally:
        os.umask(old)
    assert e.value.code == 0, se.getvalue()
    return out, json.loads(so.getvalue()), se.getvalue()


def fuse_args(z, out, *extra):
    return ["fuse", "--anchor", z / "anchor", "--parents", z / "wide1", "--out", out, *extra]


# ----------------------------------------------------------------------------- 1-3: values refused before work

@pytest.mark.parametrize("extra,message", [
    (["--reg", "inf"], "--reg inf: use a finite regulariser"),
    (["--reg", "nan"], "--reg nan"),
    (["--reg", "-1"], "reg > 0"),
    (["--solver", "emd", "--reg", "0.5"], "--reg has no effect with solver emd"),
    (["--profile", "hard-emd", "--reg", "0.1"], "--reg has no effect with solver emd"),
    (["--steps", "-5"], "is not an integer in [0, 100_000_000]"),
    (["--finetune-steps", "-5"], "is not an integer in [0, 100_000_000]"),
    (["--samples", "0"], "'--samples': 0 is not an integer >= 1"),
    (["--batch-size", "0"], "'--batch-size': 0 is not an integer >= 1"),
    (["--lr", "0"], "'--lr': 0 is not a finite number > 0"),
    (["--lr", "nan"], "'--lr': nan is not a finite number > 0"),
    (["--race-fraction", "0"], "'--race-fraction': 0 is not a number in (0, 1]"),
    (["--race-fraction", "1.5"], "'--race-fraction'"),
    (["--max-iter", "0"], "'--max-iter': 0 is not an integer >= 1"),
    (["--weights", "nan", "1"], "'--weights'"),
    (["--profile", "{t}/inf.yaml"], "option 'reg' must be a finite number > 0 or 'auto', got inf"),
    (["--profile", "{t}/neg.yaml"], "option 'finetune_steps' must be an integer >= 0"),
    (["--profile", "{t}/emd.yaml"], "'reg' has no effect with solver emd"),
    (["--profile", "{t}/choice.yaml"], "option 'cost_norm' use one of"),
    # Options that would change nothing are refused, never silently ignored.
    (["--solver", "emd", "--max-iter", "3"], "--max-iter has no effect with solver emd"),
    (["--pooling", "cls"], "--pooling needs data"),
    (["--samples", "5"], "--samples needs data"),
    (["--lr", "0.01"], "--lr applies to finetuning (steps > 0)"),
    (["--race-fraction", "0.3", "--data", "digits", "--steps", "5", "--alignment", "weights"],
     "--race-fraction applies to the default recipe's race"),
])
def test_fuse_refuses_bad_values_before_any_work(z, tmp_path, capsys, no_work, extra, message):
    (tmp_path / "inf.yaml").write_text("reg: .inf\n")
    (tmp_path / "neg.yaml").write_text("finetune_steps: -3\n")
    (tmp_path / "emd.yaml").write_text("solver: emd\nreg: 0.1\n")
    (tmp_path / "choice.yaml").write_text("cost_norm: median\n")
    out = tmp_path / "out"
    code, _, err = run(capsys, *fuse_args(z, out, *[e.format(t=tmp_path) for e in extra]))
    assert_user_error(code, err, message, out)


@pytest.mark.parametrize("extra,message", [
    (["--steps", "-1"], "'--steps': -1 is not an integer in [0, 100_000_000]"),
    (["--steps", "2", "--batch-size", "0"], "'--batch-size'"),
    (["--steps", "2", "--lr", "-1"], "'--lr'"),
    (["--steps", "2", "--lr", "inf"], "'--lr': inf"),
    (["--steps", "2", "--distill-alpha", "2"], "'--distill-alpha'"),
    (["--steps", "2", "--temperature", "0"], "'--temperature'"),
    (["--steps", "2", "--distill-alpha", "0.3"], "--distill-alpha applies to distillation: give --teachers"),
    (["--steps", "2", "--temperature", "4"], "--temperature applies to distillation: give --teachers"),
])
def test_finetune_refuses_bad_values_before_any_work(z, tmp_path, capsys, no_work, extra, message):
    out = tmp_path / "ft"
    code, _, err = run(capsys, "finetune", z / "anchor", "--data", "digits", "--out", out, *extra)
    assert_user_error(code, err, message, out)


def test_emd_from_a_profile_without_reg_on_the_command_line_is_fine(monkeypatch, z, tmp_path, capsys):
    from otcompress import pipeline
    seen = {}
    monkeypatch.setattr(pipeline, "run", lambda a, p, recipe, *x, **k: seen.update(recipe) or (_ for _ in ()).throw(
        SystemExit(0)))
    code, _, _ = run(capsys, *fuse_args(z, tmp_path / "o", "--profile", "vit-soft-wts", "--solver", "emd"))
    assert code == 0 and seen["solver"] == "emd"


# ----------------------------------------------------------------------------- 4: --max-iter

def test_max_iter_reaches_the_solver(fused):
    out, result, _ = fused
    report = json.loads((out / "fusion_report.json").read_text())
    assert report["options"]["max_iter"] == 777
    assert yaml.safe_load((out / "otcompress_config.yaml").read_text())["max_iter"] == 777


def test_max_iter_flag_sets_the_sinkhorn_sweep_limit(z, tmp_path, capsys, monkeypatch):
    from otcompress import transport
    seen, real = [], transport.solve
    monkeypatch.setattr(transport, "solve", lambda *a, **k: seen.append(k["max_iter"]) or real(*a, **k))
    code, _, err = run(capsys, *fuse_args(z, tmp_path / "out", "--alignment", "weights", "--max-iter", "777"))
    assert code == 0, err
    assert seen and set(seen) == {777}


def test_max_iter_is_a_recipe_key_with_the_engine_default():
    import inspect
    from otcompress import fusion, pipeline, recipes
    assert recipes.defaults()["max_iter"] == inspect.signature(fusion.fuse).parameters["max_iter"].default
    assert "max_iter" in pipeline.FUSE_KEYS
    with pytest.raises(recipes.InvalidOptionError, match="option 'max_iter' must be an integer >= 1"):
        recipes.check_recipe({"max_iter": 0})


# ----------------------------------------------------------------------------- 5: token filter

def test_token_filter_larger_than_the_patch_grid_refused_before_work(z, tmp_path, capsys, monkeypatch):
    from otcompress import modelio
    # Refused by the workflow's own checks on configs, before any weights are read.
    monkeypatch.setattr(modelio, "load_model", lambda *a, **k: pytest.fail("weights were read"))
    out = tmp_path / "out"
    code, _, err = run(capsys, *fuse_args(z, out, "--alignment", "activations", "--data", "digits",
                                          "--token-filter", "window_6"))
    assert_user_error(code, err, "patch grid", out)


# ----------------------------------------------------------------------------- 6: --out

def test_out_parents_are_created_and_modes_follow_the_umask(fused):
    out, _, _ = fused
    assert (out / "config.json").is_file()
    assert not [p for p in out.parent.iterdir() if p.name != "fused"]  # no hidden staging dirs
    assert out.stat().st_mode & 0o777 == 0o750
    for f in out.iterdir():
        assert f.stat().st_mode & 0o777 == 0o640, f.name


def test_created_parents_are_removed_when_the_write_fails(tmp_path):
    from otcompress import outputs
    out = tmp_path / "a" / "b" / "out"
    with pytest.raises(RuntimeError):
        with outputs.staged_dir(out) as tmp:
            (tmp / "x").write_text("x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_unwritable_out_is_a_user_error_naming_out(z, tmp_path, capsys, monkeypatch):
    from otcompress import outputs
    out = tmp_path / "ro" / "out"
    (tmp_path / "ro").mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == tmp_path / "ro" else real(p, mode))
    code, _, err = run(capsys, *fuse_args(z, out))
    assert_user_error(code, err, f"--out {out}: cannot write in", out)
    # A write that fails anyway (read-only file system, a race): still one line naming --out.
    monkeypatch.setattr(os, "access", real)

    def denied(*a, dir=None, **k):
        raise PermissionError(13, "Permission denied", str(Path(dir) / ".out.tmp-x"))
    monkeypatch.setattr(outputs.tempfile, "mkdtemp", denied)
    out2 = tmp_path / "new" / "out"
    with pytest.raises(outputs.InvalidOptionError, match=r"--out .*new/out: cannot write there \(Permission denied\)"):
        with outputs.staged_dir(out2):
            pass
    assert list(tmp_path.iterdir()) == [tmp_path / "ro"]  # the parent it made is gone again


# ----------------------------------------------------------------------------- 7: signals

SLOW_COMMAND = textwrap.dedent("""
    import sys, time
    from otcompress import outputs
    from otcompress.cli import cli, main

    @cli.command()
    def slow():
        with outputs.staged_dir(sys.argv[1]) as tmp:
            (tmp / "part").write_text("x")
            print("ready", flush=True)
            time.sleep(60)

    main(["slow"])
""")


@pytest.mark.parametrize("sig,code,message", [(signal.SIGTERM, 143, "error: terminated"),
                                              (signal.SIGINT, 130, "error: interrupted")])
def test_signals_exit_128_plus_n_and_remove_the_staged_dir(tmp_path, sig, code, message):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_COMMAND, str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == code, err
    assert err.strip() == message
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- 8: profile

def test_profile_refuses_a_seq_len_beyond_the_model_before_any_work(z, capsys, no_work):
    code, _, err = run(capsys, "profile", z / "anchor", z / "bert", "--seq-len", 64, "--no-onnx")
    assert_user_error(code, err, f"--seq-len 64: {z / 'bert'} takes at most 32 tokens")


def test_profile_loads_every_model_before_timing_any(z, capsys):
    code, _, err = run(capsys, "profile", z / "anchor", z / "corrupt", "--repeats", 1, "--no-onnx")
    assert code == 2 and "cannot load weights" in err and "profiling" not in err


def test_profile_default_seq_len_still_fits_short_models(z, capsys):
    code, stdout, err = run(capsys, "profile", z / "bert", "--repeats", 1, "--no-onnx", "--json")
    assert code == 0, err
    assert json.loads(stdout)["models"][str(z / "bert")]["inputs"]["seq_len"] == 32


# ----------------------------------------------------------------------------- 9: progress totals

def test_activation_progress_has_a_total(z):
    from otcompress import activations, architectures
    a = M.vit(seed=1).eval()
    p = M.vit(hidden=48, heads=6, inter=96, seed=2).eval()
    batches = [{"pixel_values": torch.randn(5, 1, 8, 8)}, {"pixel_values": torch.randn(3, 1, 8, 8)}]
    seen = []
    activations.collect(architectures.build_spec(a), a, [p], batches, need_costs=True, need_norms=False,
                        progress=lambda stage, done, total: seen.append((stage, done, total)))
    assert seen[-1] == ("activations", 8, 8) and all(t == 8 for _, _, t in seen)


def test_demo_reports_progress_for_every_training_run(monkeypatch, tmp_path):
    from otcompress import demo
    small = M.vit(seed=1)
    calls = []
    monkeypatch.setattr(demo, "_vit", lambda size, hidden, seed, epochs: (small, "cached"))
    monkeypatch.setattr(demo, "load_data", lambda *a, **k: "data")

    def fake_run(anchor, parents, recipe, out, data, log, progress=None):
        calls.append(("fuse", progress))
        return small, {"metrics": {"fused (one-shot)": {"accuracy": 0.5}}, "race": {"winner": "fold"}}
    monkeypatch.setattr(demo.pipeline, "run", fake_run)
    monkeypatch.setattr(demo, "export_onnx", lambda *a, **k: {"max_abs_diff": 0.0})
    monkeypatch.setattr(demo, "finetune", lambda model, data, progress=None, **k: calls.append(("ft", progress)))
    monkeypatch.setattr(demo, "evaluate", lambda *a, **k: {"accuracy": 0.5})
    monkeypatch.setattr(demo, "profile_model", lambda *a, **k: {
        "parameters": 1, "flops": {"flops": 1}, "latency_pytorch": {"median_ms": 1}, "latency_onnx": {"median_ms": 1}})
    updates = []

    class Bar:
        def __enter__(self):
            return lambda stage, done, total: updates.append((stage, done, total))

        def __exit__(self, *exc):
            return False
    demo.run_demo(tmp_path / "demo", steps=4, log=lambda m: None, progress_factory=Bar)
    assert [k for k, _ in calls] == ["fuse", "ft", "ft"] and all(p is not None for _, p in calls)
    calls[1][1](2, 4)
    assert updates == [("finetune: anchor alone", 2, 4)]


# ----------------------------------------------------------------------------- 10-11: streams

def test_log_lines_do_not_wrap_in_a_pipe(capsys):
    import warnings
    from otcompress.cli import UI
    before = warnings.showwarning
    UI().log("word " * 40)
    assert warnings.showwarning is before  # only main() routes warnings
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_quiet_silences_logs_but_not_the_result_table(capsys):
    code, stdout, err = run(capsys, "profiles", "-q")
    assert code == 0 and err == ""
    assert "vit-soft-acts" in stdout
    code, stdout, err = run(capsys, "profiles", "-q", "--json")
    assert code == 0 and err == "" and set(json.loads(stdout)) == {"profiles"}


# ----------------------------------------------------------------------------- 12: finetune keeps the lineage

def test_finetune_carries_the_fusion_report_and_model_card(fused, tmp_path, capsys):
    src, _, _ = fused
    out = tmp_path / "sub" / "ft"
    code, stdout, err = run(capsys, "finetune", src, "--data", "digits", "--steps", 1, "--batch-size", 16,
                            "--out", out, "--json")
    assert code == 0, err
    assert json.loads(stdout)["path"] == str(out)
    report = json.loads((out / "fusion_report.json").read_text())
    before = json.loads((src / "fusion_report.json").read_text())
    assert report["transport_maps"] == before["transport_maps"] and report["options"] == before["options"]
    assert report["finetune"]["steps"] == 1 and report["finetune"]["data"] == "digits"
    assert any("finetuned 1 steps" in k for k in report["metrics"])
    card = (out / "README.md").read_text()
    assert "optimal-transport" in card and "finetuned 1 steps" in card
    assert (out / "otcompress_config.yaml").is_file()


# ----------------------------------------------------------------------------- 13-15: help, names, profiles

def test_help_has_examples_and_fuse_help_shows_recipe_defaults(capsys):
    code, stdout, _ = run(capsys, "--help")
    assert code == 0 and "Examples:" in stdout and "otcompress fuse --anchor" in stdout
    code, stdout, _ = run(capsys, "fuse", "--help")
    flat = " ".join(stdout.split())
    assert "Examples:" in stdout
    for shown in ("[default: 0.02]", "[default: sinkhorn]", "[default: 5000]", "[default: 200]", "[default: auto]"):
        assert shown in flat, shown
    assert "--steps INTEGER" in stdout and "--finetune-steps INTEGER" not in stdout


@pytest.mark.parametrize("flag", ["--steps", "--finetune-steps"])
def test_fuse_takes_steps_like_finetune(monkeypatch, z, tmp_path, capsys, flag):
    from otcompress import pipeline
    seen = {}

    def fake(a, p, recipe, *x, **k):
        seen.update(recipe)
        raise SystemExit(0)
    monkeypatch.setattr(pipeline, "run", fake)
    run(capsys, *fuse_args(z, tmp_path / "o", flag, 3, "--data", "digits"))
    assert seen["finetune_steps"] == 3


def test_profiles_command_lists_named_recipes_with_descriptions(capsys):
    code, stdout, err = run(capsys, "profiles", "--json")
    assert code == 0, err
    named = json.loads(stdout)["profiles"]
    assert {"vit-soft-acts", "hard-emd", "bert-soft-wts"} <= set(named)
    assert all(text and "\n" not in text for text in named.values())


# ----------------------------------------------------------------------------- 16-17: summary and JSON keys

def test_fuse_summarises_what_it_did(fused):
    _, _, err = fused
    assert "fused: alignment weights, solver sinkhorn, reg 0.02" in err
    assert "widths hidden 32, heads 4, intermediate 64, layers 2 (parents: hidden 48" in err
    assert "parameters = 0.46x the parent's" in err


def test_every_command_names_what_it_wrote_with_path(fused, z, tmp_path, capsys):
    out, result, _ = fused
    assert result["path"] == str(out) and result["out"] == str(out)  # "out": kept one release
    onnx = tmp_path / "made" / "m.onnx"
    code, stdout, err = run(capsys, "export", z / "anchor", "--out", onnx, "--quantize", "int8", "--json")
    assert code == 0, err
    rep = json.loads(stdout)
    assert rep["path"] == str(onnx)
    assert sorted(rep["files"]) == sorted([str(onnx), str(onnx.with_name("m.int8.onnx"))])
    assert all(Path(f).is_file() for f in rep["files"])


def test_library_recipes_refuse_settings_that_change_nothing(z):
    from otcompress import pipeline
    from otcompress.errors import InvalidOptionError
    with pytest.raises(InvalidOptionError, match="recipe option 'reg' has no effect with solver emd"):
        pipeline.run(z / "anchor", [z / "wide1"], {"solver": "emd", "reg": 0.5})
    # The defaults themselves never count as a setting.
    pipeline.run(z / "anchor", [z / "wide1"], {"solver": "emd", "reg": 0.02, "alignment": "weights"})
