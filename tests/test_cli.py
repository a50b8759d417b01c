"""The CLI end to end on tiny models: real files, real ONNX Runtime sessions,
real fvcore counts. Bad input: one line, exit code 2, nothing at --out."""
import json
from pathlib import Path

import pytest
import torch
import transformers as T
import yaml

import models as M
from otcompress.cli import expand_multi_value, main
from otcompress.data import pydoc_paragraphs, train_wordpiece_tokenizer


def run(capsys, *args):
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return e.value.code, out, err


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    M.vit(seed=1).save_pretrained(d / "anchor")
    M.vit(hidden=48, heads=6, inter=96, seed=2).save_pretrained(d / "wide1")
    M.vit(hidden=64, heads=8, inter=128, seed=3).save_pretrained(d / "wide2")
    M.vit(layers=3).save_pretrained(d / "deep")
    M.vit(image=16).save_pretrained(d / "big_image")
    tok = train_wordpiece_tokenizer(pydoc_paragraphs()[:300], 200, d / "tok")
    for name, hidden, heads, seed in (("bert_a", 32, 4, 1), ("bert_p", 48, 6, 2)):
        M.bert(hidden=hidden, heads=heads, inter=2 * hidden, seed=seed, vocab=len(tok)).save_pretrained(d / name)
        tok.save_pretrained(d / name)
    M.bert(vocab=len(tok) + 5).save_pretrained(d / "bert_vocab")
    (d / "not_a_model").mkdir()
    (d / "not_a_model" / "notes.txt").write_text("hello")
    M.vit(seed=4).save_pretrained(d / "corrupt")
    w = d / "corrupt" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:200])
    return d


def test_parents_take_several_values():
    assert expand_multi_value(["fuse", "--parents", "a", "b", "--out", "o"]) == \
        ["fuse", "--parents", "a", "--parents", "b", "--out", "o"]
    assert expand_multi_value(["--weights", "2", "-1"])[:2] == ["--weights", "2"]


def test_fuse_end_to_end(zoo, tmp_path, capsys):
    out = tmp_path / "fused"
    code, stdout, err = run(capsys, "fuse", "--anchor", zoo / "anchor", "--parents", zoo / "wide1", zoo / "wide2",
                            "--out", out, "--alignment", "activations", "--data", "digits", "--samples", 64,
                            "--finetune-steps", 5, "--batch-size", 32, "--weights", 2, 1, 1, "--json")
    assert code == 0, err
    result = json.loads(stdout)  # exactly one JSON object on stdout
    assert result["out"] == str(out)
    model = T.ViTForImageClassification.from_pretrained(out)
    assert model.config.hidden_size == 32
    assert torch.isfinite(M.outputs(model, M.inputs(model))).all()
    report = json.loads((out / "fusion_report.json").read_text())
    assert report["schema"].startswith("otcompress.fusion_report/")
    assert report["options"]["weights"] == [0.5, 0.25, 0.25]
    assert report["parents"] == [str(zoo / "wide1"), str(zoo / "wide2")]
    assert len(report["transport_maps"]) == 2 and "L0.fc1" in report["transport_maps"][0]
    assert {"anchor", "fused (one-shot)", "fused + 5 steps"} <= set(report["metrics"])
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "transformers" and "otcompress" in front["tags"]
    assert front["base_model"][0] == str(zoo / "anchor")
    recipe = yaml.safe_load((out / "otcompress_config.yaml").read_text())
    assert recipe["alignment"] == "activations" and recipe["finetune_steps"] == 5


def test_profile_recipe_and_flag_override(zoo, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("solver: emd\nqk: shared\nresidual: average\n")
    code, _, err = run(capsys, "fuse", "--anchor", zoo / "anchor", "--parents", zoo / "wide1",
                       "--out", tmp_path / "o1", "--profile", recipe, "--quiet")
    assert code == 0, err
    rep = json.loads((tmp_path / "o1" / "fusion_report.json").read_text())
    assert rep["options"]["solver"] == "emd" and rep["options"]["qk"] == "shared"
    code, _, err = run(capsys, "fuse", "--anchor", zoo / "anchor", "--parents", zoo / "wide1",
                       "--out", tmp_path / "o2", "--profile", recipe, "--solver", "sinkhorn", "--reg", "0.2", "-q")
    assert code == 0, err
    rep = json.loads((tmp_path / "o2" / "fusion_report.json").read_text())
    assert rep["options"]["solver"] == "sinkhorn" and rep["options"]["reg"] == 0.2
    # A flag may make a profile's own option moot: --steps 0 under a profile that sets an lr.
    trained = tmp_path / "trained.yaml"
    trained.write_text("finetune_steps: 3\nlr: 0.01\n")
    code, _, err = run(capsys, "fuse", "--anchor", zoo / "anchor", "--parents", zoo / "wide1", "--out",
                       tmp_path / "o3", "--profile", trained, "--steps", 0, "--alignment", "weights", "-q")
    assert code == 0, err
    assert "finetune" not in json.loads((tmp_path / "o3" / "fusion_report.json").read_text())


def test_named_profiles_parse():
    from otcompress import recipes
    names = recipes.available()
    assert {"vit-soft-acts", "bert-soft-wts"} <= set(names)
    for name in names:
        recipes.load_recipe(name)


def test_bert_text_fusion_and_eval(zoo, tmp_path, capsys):
    out = tmp_path / "bert_fused"
    code, _, err = run(capsys, "fuse", "--anchor", zoo / "bert_a", "--parents", zoo / "bert_p", "--out", out,
                       "--alignment", "activations", "--data", "pydoc", "--samples", 32, "--reg", "auto", "-q")
    assert code == 0, err
    assert (out / "tokenizer.json").exists() or (out / "vocab.txt").exists()
    report = json.loads((out / "fusion_report.json").read_text())
    assert report["reg_sweep"] and report["options"]["reg"] in [s["reg"] for s in report["reg_sweep"]]
    code, stdout, err = run(capsys, "eval", out, "--data", "pydoc", "--json")
    assert code == 0, err
    metrics = json.loads(stdout)
    assert metrics["perplexity"] > 1 and metrics["tokens"] > 0


def test_finetune_with_teachers(zoo, tmp_path, capsys):
    out = tmp_path / "ft"
    code, stdout, err = run(capsys, "finetune", zoo / "anchor", "--data", "digits", "--steps", 5,
                            "--batch-size", 32, "--teachers", zoo / "wide1", zoo / "wide2", "--out", out, "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert result["teachers"] == [str(zoo / "wide1"), str(zoo / "wide2")]
    assert result["finetune"]["steps"] == 5
    assert T.ViTForImageClassification.from_pretrained(out).config.hidden_size == 32


def test_profile_and_export(zoo, tmp_path, capsys):
    code, stdout, err = run(capsys, "profile", zoo / "anchor", zoo / "wide2", "--repeats", 3, "--json")
    assert code == 0, err
    res = json.loads(stdout)["models"]
    small, big = res[str(zoo / "anchor")], res[str(zoo / "wide2")]
    assert small["parameters"] < big["parameters"]
    assert 0 < small["flops"]["flops"] < big["flops"]["flops"]
    assert small["latency_onnx"]["median_ms"] > 0
    onnx_path = tmp_path / "m.onnx"
    code, stdout, err = run(capsys, "export", zoo / "anchor", "--out", onnx_path, "--quantize", "int8",
                            "--data", "digits", "--json")
    assert code == 0, err
    rep = json.loads(stdout)
    assert rep["max_abs_diff"] < 1e-4
    assert onnx_path.exists() and Path(rep["quantized"]["path"]).exists()
    assert 0 <= rep["quantized"]["accuracy"]["int8"] <= 1
    code, _, err = run(capsys, "export", zoo / "anchor", "--out", onnx_path)
    assert code == 2 and "already exists" in err


@pytest.mark.parametrize("case,args,message", [
    ("missing", ["--anchor", "{z}/nope", "--parents", "{z}/wide1"], "no such model directory"),
    ("not a model", ["--anchor", "{z}/not_a_model", "--parents", "{z}/wide1"], "not a model directory"),
    ("corrupt", ["--anchor", "{z}/anchor", "--parents", "{z}/corrupt"], "cannot load weights"),
    ("depth", ["--anchor", "{z}/deep", "--parents", "{z}/anchor"], "the anchor has 3 blocks, parent 1 only 2"),
    ("kv heads", ["--parents", "{z}/wide1", "--kv-heads", "1"], "no grouped-query attention"),
    ("type", ["--anchor", "{z}/anchor", "--parents", "{z}/bert_p"], "model-type mismatch"),
    ("vocab", ["--anchor", "{z}/bert_a", "--parents", "{z}/bert_vocab"], "vocabulary mismatch"),
    ("image", ["--anchor", "{z}/anchor", "--parents", "{z}/big_image"], "image-size mismatch"),
    ("hub", ["--anchor", "google/vit-base-patch16-224", "--parents", "{z}/wide1"], "offline"),
    ("data", ["--anchor", "{z}/anchor", "--parents", "{z}/wide1", "--alignment", "activations",
              "--data", "nosuchspec"], "data spec"),
    ("reg", ["--anchor", "{z}/anchor", "--parents", "{z}/wide1", "--reg", "0"], "reg > 0"),
    ("reg text", ["--anchor", "{z}/anchor", "--parents", "{z}/wide1", "--reg", "soft"], "--reg soft"),
    ("acts no data", ["--anchor", "{z}/anchor", "--parents", "{z}/wide1", "--alignment", "activations"],
     "needs --data"),
    ("bad yaml", ["--anchor", "{z}/anchor", "--parents", "{z}/wide1", "--profile", "{t}/bad.yaml"], "not valid YAML"),
    ("unknown key", ["--anchor", "{z}/anchor", "--parents", "{z}/wide1", "--profile", "{t}/unknown.yaml"],
     "unknown option 'sinkhorn_reg'"),
    ("bad choice", ["--anchor", "{z}/anchor", "--parents", "{z}/wide1", "--solver", "lp"], "Invalid value"),
])
def test_bad_input_one_line_exit_2_nothing_written(zoo, tmp_path, capsys, case, args, message):
    (tmp_path / "bad.yaml").write_text("solver: [emd\n")
    (tmp_path / "unknown.yaml").write_text("sinkhorn_reg: 0.1\n")
    out = tmp_path / "out"
    args = [a.format(z=zoo, t=tmp_path) for a in args]
    code, stdout, err = run(capsys, "fuse", *args, "--out", out)
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], err
    assert "Traceback" not in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_existing_out_refused_then_forced(zoo, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    code, _, err = run(capsys, "fuse", "--anchor", zoo / "anchor", "--parents", zoo / "wide1", "--out", out)
    assert code == 2 and "already exists" in err and (out / "keep.txt").exists()
    code, _, err = run(capsys, "fuse", "--anchor", zoo / "anchor", "--parents", zoo / "wide1", "--out", out,
                       "--force", "-q")  # a directory otcompress did not write: never replaced
    assert code == 2 and "otcompress did not write it" in err and (out / "keep.txt").exists()
    (out / "keep.txt").unlink()  # an empty directory may be replaced
    code, _, err = run(capsys, "fuse", "--anchor", zoo / "anchor", "--parents", zoo / "wide1", "--out", out,
                       "--force", "-q")
    assert code == 0 and (out / "config.json").exists()


def test_failure_midway_leaves_nothing(zoo, tmp_path, capsys, monkeypatch):
    import otcompress.fusion
    def boom(*a, **k):
        raise otcompress.fusion.SolverError("transport map L0.q: Sinkhorn (reg=1e-09) did not converge")
    monkeypatch.setattr(otcompress.fusion, "align_parent", boom)
    out = tmp_path / "out"
    code, _, err = run(capsys, "fuse", "--anchor", zoo / "anchor", "--parents", zoo / "wide1", "--out", out)
    assert code == 2 and "did not converge" in err
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- a new user's findings (issue 10)

@pytest.fixture(scope="module")
def more(zoo, tmp_path_factory):
    """Teachers that must be refused, headless models, and models in look-alike folders."""
    d = tmp_path_factory.mktemp("more")
    tok = T.AutoTokenizer.from_pretrained(zoo / "bert_a")
    M.vit(seed=5, cls=T.ViTModel).save_pretrained(d / "vit_headless_a")
    M.vit(hidden=48, heads=6, inter=96, seed=6, cls=T.ViTModel).save_pretrained(d / "vit_headless_p")
    cfg = M.vit().config
    cfg.num_labels = 3
    T.ViTForImageClassification(cfg).save_pretrained(d / "vit_3_labels")
    M.bert(vocab=len(tok), cls=T.BertForSequenceClassification).save_pretrained(d / "bert_seqcls")
    T.GPT2LMHeadModel(T.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=len(tok),
                                   n_positions=32)).save_pretrained(d / "gpt2")
    M.vit(seed=1).save_pretrained(d / "a" / "model")
    M.vit(hidden=48, heads=6, inter=96, seed=2).save_pretrained(d / "b" / "model")
    return d


def assert_user_error(code, err, message, out):
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], err
    assert "Traceback" not in err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


@pytest.mark.parametrize("student,teachers,data,message", [
    ("{z}/anchor", ["{z}/bert_p"], "digits", "model-type mismatch: student is vit, teacher 1 is bert"),
    ("{z}/anchor", ["{z}/big_image"], "digits", "image-size mismatch: student has image_size=8, teacher 1"),
    ("{z}/anchor", ["{m}/vit_3_labels"], "digits", "label mismatch: student has 10 labels, teacher 1 has 3"),
    ("{z}/anchor", ["{m}/vit_headless_p"], "digits", "teacher 1 (ViTModel) has no task head"),
    ("{z}/anchor", ["{z}/wide1", "{z}/big_image"], "digits", "teacher 2 has image_size=16"),
    ("{z}/bert_a", ["{z}/bert_vocab"], "pydoc", "vocabulary mismatch"),
    ("{z}/bert_a", ["{m}/gpt2"], "pydoc", "model-type mismatch: student is bert, teacher 1 is gpt2"),
    ("{z}/bert_a", ["{m}/bert_seqcls"], "pydoc", "head mismatch: student is BertForMaskedLM"),
    ("{z}/anchor", ["{z}/nope"], "digits", "no such model directory"),
])
def test_finetune_refuses_bad_teachers_before_any_work(zoo, more, tmp_path, capsys, monkeypatch,
                                                       student, teachers, data, message):
    from otcompress import finetune as ft
    from otcompress import modelio

    def no_work(*a, **k):
        raise AssertionError("teachers must be validated before weights are read or training starts")
    monkeypatch.setattr(modelio, "load_model", no_work)
    monkeypatch.setattr(ft, "finetune", no_work)
    out = tmp_path / "ft"
    fmt = lambda s: s.format(z=zoo, m=more)  # noqa: E731
    code, _, err = run(capsys, "finetune", fmt(student), "--data", data, "--steps", 2, "--out", out,
                       "--teachers", *map(fmt, teachers))
    assert_user_error(code, err, message, out)


def test_finetune_accepts_a_deeper_teacher_and_shows_the_eval_split(zoo, tmp_path, capsys):
    out = tmp_path / "ft"
    code, stdout, err = run(capsys, "finetune", zoo / "anchor", "--data", "digits", "--steps", 2,
                            "--batch-size", 32, "--teachers", zoo / "deep", "--out", out)
    assert code == 0, err
    assert "eval" in stdout and "450" in stdout  # which split, how many examples
    report = json.loads((out / "finetune_report.json").read_text())
    assert report["split"] == "eval" and report["examples"] == 450


def write_npy_folder(root, classes=3, per_class=4):
    import numpy as np
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            np.save(root / f"class{c}" / f"{i}.npy", rng.random((8, 8)).astype(np.float32))
    return root


def test_eval_whole_user_file_by_default_and_split_option(zoo, tmp_path, capsys):
    folder = write_npy_folder(tmp_path / "imgs")
    code, stdout, err = run(capsys, "eval", zoo / "anchor", "--data", folder, "--json")
    assert code == 0, err
    res = json.loads(stdout)
    assert res["split"] == "all" and res["examples"] == 12
    code, stdout, err = run(capsys, "eval", zoo / "anchor", "--data", folder, "--split", "eval", "--json")
    assert code == 0, err
    assert json.loads(stdout)["examples"] == 3
    # Built-in digits: the held-out quarter unless told otherwise.
    code, stdout, err = run(capsys, "eval", zoo / "anchor", "--data", "digits", "--json")
    assert json.loads(stdout)["split"] == "eval" and json.loads(stdout)["examples"] == 450
    code, stdout, err = run(capsys, "eval", zoo / "anchor", "--data", "digits", "--split", "all", "--json")
    assert json.loads(stdout)["examples"] == 1797
    # The table says which split and how many examples.
    code, stdout, err = run(capsys, "eval", zoo / "anchor", "--data", folder)
    assert code == 0, err
    header = next(line for line in stdout.splitlines() if "split" in line)
    assert "examples" in header and "accuracy" in header
    assert any("all" in line and "12" in line for line in stdout.splitlines())
    code, _, err = run(capsys, "eval", zoo / "anchor", "--data", "digits", "--split", "test")
    assert code == 2 and "Invalid value" in err


def test_headless_vit_fuses_with_labelled_data(zoo, more, tmp_path, capsys):
    out = tmp_path / "fused"
    code, _, err = run(capsys, "fuse", "--anchor", more / "vit_headless_a", "--parents", more / "vit_headless_p",
                       "--out", out, "--alignment", "activations", "--data", "digits", "--samples", 32, "-q")
    assert code == 0, err  # not "10 classes but the model has 2 labels"
    model = T.ViTModel.from_pretrained(out)
    assert model.config.hidden_size == 32 and torch.isfinite(M.outputs(model, M.inputs(model))).all()
    # Headless: eval and finetune use the embedding objective against reference models / teachers.
    code, _, err = run(capsys, "eval", more / "vit_headless_a", "--data", "digits")
    assert code == 2 and "has no task head: eval scores its embeddings against --reference" in err
    assert len(err.strip().splitlines()) == 1
    code, stdout, err = run(capsys, "eval", out, "--data", "digits", "--reference", more / "vit_headless_p", "--json")
    assert code == 0, err
    fused_score = json.loads(stdout)
    assert fused_score["examples"] == 450 and -1 <= fused_score["similarity_pearson"] <= 1
    code, _, err = run(capsys, "eval", zoo / "anchor", "--data", "digits", "--reference", more / "vit_headless_p")
    assert code == 2 and "--reference scores a headless model's embeddings" in err
    ft_out = tmp_path / "ft"
    code, _, err = run(capsys, "finetune", more / "vit_headless_a", "--data", "digits", "--steps", 2,
                       "--out", ft_out)
    assert_user_error(code, err, "has no task head", ft_out)
    code, stdout, err = run(capsys, "finetune", out, "--data", "digits", "--steps", 30, "--lr", 3e-3,
                            "--out", ft_out, "--teachers", more / "vit_headless_p", "--json")
    assert code == 0, err
    trained = json.loads(stdout)["metrics"]
    assert trained["after"]["loss"] < trained["before"]["loss"]
    code, stdout, err = run(capsys, "export", ft_out, "--out", tmp_path / "m.onnx", "--quantize", "int8",
                            "--data", "digits", "--json")
    assert code == 0, err
    cosine = json.loads(stdout)["quantized"]["embedding"]
    assert cosine["examples"] == 450 and 0.5 < cosine["embedding_cosine"] <= 1


def test_profile_names_models_in_one_folder_apart(more, capsys):
    code, stdout, err = run(capsys, "profile", more / "a" / "model", more / "b" / "model", "--repeats", 1,
                            "--no-onnx")
    assert code == 0, err
    first_cells = [line.split("│")[1].strip() for line in stdout.splitlines() if line.startswith("│")]
    assert "a/model" in first_cells and "b/model" in first_cells
    code, _, err = run(capsys, "profile", more / "a" / "model", more / "nope", "--repeats", 1, "--no-onnx")
    assert code == 2 and "no such model directory" in err and "profiling" not in err


def test_short_names_are_unique_suffixes():
    from otcompress.cli import short_names
    paths = ["/runs/x/a/model", "/runs/y/a/model", "/runs/b/model", "other/", "/runs/x/a/model2"]
    assert short_names(paths) == {"/runs/x/a/model": "x/a/model", "/runs/y/a/model": "y/a/model",
                                  "/runs/b/model": "b/model", "other/": "other",
                                  "/runs/x/a/model2": "model2"}


def test_the_mission_command_with_deeper_parents(zoo, tmp_path, capsys):
    """`fuse --anchor small --parents large1 large2` where the large ones are
    deeper (as in every real size step of a family), then a fold target with
    --layers: both write shallow models that load, with the depth maps recorded."""
    out = tmp_path / "fused"
    code, stdout, err = run(capsys, "fuse", "--anchor", zoo / "anchor", "--parents", zoo / "deep", zoo / "wide2",
                            "--out", out, "--data", "digits", "--samples", 64, "--steps", 4, "--batch-size", 32,
                            "--json")
    assert code == 0, err
    model = T.ViTForImageClassification.from_pretrained(out)
    assert model.config.num_hidden_layers == 2
    assert json.loads((out / "fusion_report.json").read_text())["race"]["winner"]
    folded = tmp_path / "folded"
    code, stdout, err = run(capsys, "fuse", "--parents", zoo / "deep", "--layers", 1, "--hidden", 16, "--heads", 2,
                            "--out", folded, "--json")
    assert code == 0, err
    model = T.ViTForImageClassification.from_pretrained(folded)
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (1, 16)
    report = json.loads((folded / "fusion_report.json").read_text())
    assert len(_depth_maps(report)[0]["kept"]) == 1
    assert len(_depth_maps(report)[0]["influence"]) == 3
    card = (folded / "README.md").read_text()
    assert "depth map of parent 1 (3 -> 1 blocks, select" in card
    # the scores the blocks were chosen by, as the report has them
    assert "block influence of its blocks " + ", ".join(f"{x:.4g}" for x in _depth_maps(report)[0]["influence"]) in card
    merged = tmp_path / "merged"
    code, stdout, err = run(capsys, "fuse", "--parents", zoo / "deep", "--layers", 1, "--hidden", 16, "--heads", 2,
                            "--depth-merge", "parallel", "--out", merged, "--json")
    assert code == 0, err
    assert T.ViTForImageClassification.from_pretrained(merged).config.num_hidden_layers == 1
    assert "3 -> 1 blocks, parallel" in (merged / "README.md").read_text()
    too_deep = tmp_path / "too_deep"
    code, stdout, err = run(capsys, "fuse", "--parents", zoo / "deep", "--layers", 4, "--hidden", 16, "--heads", 2,
                            "--out", too_deep)
    assert code == 2 and not too_deep.exists()
    assert err.strip().splitlines()[-1] == ("error: depth mismatch: the fold target has 4 blocks, parent 1 only 3; "
                                            "a parent must be at least as deep as the fold target")


def _depth_maps(report):
    """Depth maps wherever the workflow's report holds the fusion's."""
    text = json.dumps(report)
    assert '"depth_maps"' in text
    found = []

    def walk(node):
        if isinstance(node, dict):
            if "depth_maps" in node:
                found.extend(m for m in node["depth_maps"] if m)
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
    walk(report)
    return found
