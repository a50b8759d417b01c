"""finetune through Hugging Face accelerate: one CPU process trains exactly as
the plain loop did; two gloo processes (DDP) follow the same loss trajectory;
bf16 mixed precision on CPU."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import models as M
from otcompress import finetune as ft
from otcompress.data import load_data
from otcompress.errors import InvalidOptionError

ROOT = Path(__file__).resolve().parent.parent
STEPS, BATCH, SEED = 6, 16, 3


@pytest.fixture(scope="module")
def digits():
    return load_data("digits", M.vit())


def _params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _plain_loop(model, data, teacher, steps):
    """The loop as it was before accelerate, step for step."""
    opt = ft._optimizer(model, 1e-3, 0.01)
    batches = ft._train_batches(data, BATCH, SEED)
    losses = []
    teacher.eval()
    with ft._seeded(SEED, torch.device("cpu")):
        model.train()
        for step in range(steps):
            for g in opt.param_groups:
                g["lr"] = ft.lr_at(step, steps, 1e-3, 0.1)
            loss, _ = ft._step_loss(lambda b: ft._scored(model, b), [teacher], next(batches), 0.5, 2.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return losses


def test_one_cpu_process_trains_exactly_like_the_plain_loop(digits):
    a, b = M.vit(seed=1), M.vit(seed=1)
    teacher = M.vit(hidden=48, heads=6, seed=2)
    trainer = ft.Trainer(a, digits, steps=STEPS, lr=1e-3, batch_size=BATCH, seed=SEED, teachers=[teacher])
    assert trainer.accelerator.num_processes == 1 and trainer.accelerator.mixed_precision == "no"
    report = trainer.run(STEPS).summary()
    assert report["losses"] == _plain_loop(b, digits, teacher, STEPS)
    assert torch.equal(_params(a), _params(b))
    assert not hasattr(a, "_original_forward")  # the caller's model is not patched by accelerate
    assert not a.training


def test_mixed_precision_options_are_checked():
    with pytest.raises(InvalidOptionError, match="mixed precision 'fp8'"):
        ft.Trainer(M.vit(), None, steps=1, mixed_precision="fp8")
    with pytest.raises(InvalidOptionError, match="fp16 mixed precision needs a GPU"):
        ft.Trainer(M.vit(), None, steps=1, mixed_precision="fp16")


WORKER = r"""
import json, os, sys
import torch
import transformers as T
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
import models as M
from otcompress import finetune as ft
from otcompress.data import load_data
cls = T.ViTModel if {headless} else T.ViTForImageClassification
data = load_data("digits", M.vit(cls=cls))
model, teacher = M.vit(seed=1, cls=cls), M.vit(hidden=48, heads=6, seed=2, cls=cls)
rows = []
model.base_model.embeddings.register_forward_hook(lambda m, args, out: rows.append(out.shape[0]))
trainer = ft.Trainer(model, data, steps={steps}, lr=1e-3, batch_size={batch}, seed={seed}, teachers=[teacher],
                     mixed_precision={mp!r})
trainer.run({steps})
acc = trainer.accelerator
out = {{"rank": acc.process_index, "world": acc.num_processes, "mp": acc.mixed_precision, "rows": rows,
       "losses": trainer.summary()["losses"], "params": [float(x) for x in torch.cat(
           [p.detach().flatten() for p in model.parameters()])[::97]]}}
with open(os.path.join({out!r}, f"rank{{acc.process_index}}.json"), "w") as f:
    json.dump(out, f)
"""


def _run_workers(tmp_path, n, mp=None, timeout=120, headless=False):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(ROOT / "tests"), steps=STEPS, batch=BATCH, seed=SEED, mp=mp,
                                    out=str(tmp_path), headless=headless))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TRANSFORMERS_VERBOSITY": "error"}
    procs = []
    if n > 1:
        with socket.socket() as s:  # a free port for the gloo rendezvous
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        for rank in range(n):
            procs.append(subprocess.Popen(
                [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                env={**env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(n),
                     "RANK": str(rank), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(n),
                     "ACCELERATE_USE_CPU": "true"}))
    else:
        procs.append(subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, env=env))
    try:
        outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, text in zip(procs, outputs):
        assert p.returncode == 0, text[-3000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(n)]


def test_two_gloo_processes_follow_the_one_process_trajectory(tmp_path, digits):
    """2-process CPU DDP (what `accelerate launch --num_processes 2 --cpu` sets
    up): each process trains on half of every batch; the reported loss is the
    whole batch's and the gradient too, so it matches one process up to
    floating-point summation order (the test models have no dropout)."""
    ranks = _run_workers(tmp_path, 2)
    assert [r["world"] for r in ranks] == [2, 2]
    assert [r["rows"] for r in ranks] == [[BATCH // 2] * STEPS] * 2  # each trained on half of every batch
    assert ranks[0]["losses"] == ranks[1]["losses"]  # every process reports the whole batch's loss
    assert ranks[0]["params"] == ranks[1]["params"]  # DDP keeps the replicas identical
    model, teacher = M.vit(seed=1), M.vit(hidden=48, heads=6, seed=2)
    one = ft.Trainer(model, digits, steps=STEPS, lr=1e-3, batch_size=BATCH, seed=SEED, teachers=[teacher])
    one.run(STEPS)
    print("largest loss difference, 2 processes vs 1:",
          max(abs(a - b) for a, b in zip(ranks[0]["losses"], one.summary()["losses"])))
    assert ranks[0]["losses"] == pytest.approx(one.summary()["losses"], rel=1e-4, abs=1e-5)
    assert ranks[0]["params"] == pytest.approx(_params(model)[::97].tolist(), abs=1e-4)


def test_bf16_mixed_precision_on_cpu(tmp_path):
    """accelerate's state is per process: mixed precision gets a fresh one."""
    (run,) = _run_workers(tmp_path, 1, mp="bf16")
    assert run["mp"] == "bf16" and len(run["losses"]) == STEPS
    assert all(torch.isfinite(torch.tensor(run["losses"])))
    assert run["losses"][-1] < run["losses"][0]


def test_two_gloo_processes_follow_one_process_on_the_embedding_objective(tmp_path):
    """A headless model's similarity loss needs the whole batch: every process
    gathers all processes' embeddings, so 2 processes follow 1."""
    import transformers as T
    ranks = _run_workers(tmp_path, 2, headless=True)
    assert [r["rows"] for r in ranks] == [[BATCH // 2] * STEPS] * 2
    assert ranks[0]["losses"] == ranks[1]["losses"] and ranks[0]["params"] == ranks[1]["params"]
    data = load_data("digits", M.vit(cls=T.ViTModel))
    model, teacher = M.vit(seed=1, cls=T.ViTModel), M.vit(hidden=48, heads=6, seed=2, cls=T.ViTModel)
    one = ft.Trainer(model, data, steps=STEPS, lr=1e-3, batch_size=BATCH, seed=SEED, teachers=[teacher])
    one.run(STEPS)
    assert ranks[0]["losses"] == pytest.approx(one.summary()["losses"], rel=1e-4, abs=1e-6)
    assert ranks[0]["params"] == pytest.approx(_params(model)[::97].tolist(), abs=1e-4)
