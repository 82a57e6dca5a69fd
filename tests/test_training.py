"""pipeline.training.Loop on a tiny model: what checkpoints resume from, finished-run figures, corrupt
checkpoints, dying with the parent, EMA. The distillation stages' own runs are in test_distill.py."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file

from pipeline.config import TrainLoop
from pipeline.training import Loop, _claim, _hash_tensor

from tests.params import REPO  # noqa: E402


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def tiny_data(seed=1, n=16):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(n, 3, generator=g), "y": torch.randn(n, 2, generator=g)}


class Counting:
    """A loss that also reads a frozen 'teacher' and counts its calls (the first is Loop's gradient probe)."""

    def __init__(self, teacher=None):
        self.teacher, self.calls = teacher, 0

    def __call__(self, model, batch, gen):
        self.calls += 1
        x = batch["x"] + 0.1 * torch.randn(batch["x"].shape, generator=gen)
        y = batch["y"] if self.teacher is None else self.teacher(batch["x"]).detach()
        return {"loss": torch.nn.functional.mse_loss(model(x), y)}


def train(steps, batch_size=4):
    return TrainLoop(steps=steps, batch_size=batch_size, lr=1e-2, warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0)


def loop(ck, steps=4, model=None, data=None, loss=None, frozen=None, **kw):
    kw = {"checkpoint_every": 2, "keep_checkpoints": 2, **kw}
    return Loop("tiny", model or tiny_model(), data or tiny_data(), loss or Counting(),
                train(steps), 0, ck, frozen=frozen or {}, **kw)


def final(lp):
    return {k: v.detach().clone() for k, v in lp.model.state_dict().items()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_key_covers_data_initial_weights_and_frozen_models_not_steps(tmp_path):
    teacher = torch.nn.Linear(3, 2)
    base = loop(tmp_path, frozen={"teacher": teacher}).key()
    assert loop(tmp_path, frozen={"teacher": teacher}).key() == base
    assert loop(tmp_path, steps=5, frozen={"teacher": teacher}).key() == base  # the prefix rule
    assert other_lr(tmp_path, 4, frozen={"teacher": teacher}).key() != base
    d = tiny_data()
    d["x"] = d["x"].flip(0)  # same sums, other bytes: a float summary of the tensor would not notice
    assert loop(tmp_path, data=d, frozen={"teacher": teacher}).key() != base
    assert loop(tmp_path, model=tiny_model(seed=5), frozen={"teacher": teacher}).key() != base
    t2 = torch.nn.Linear(3, 2)
    t2.load_state_dict(teacher.state_dict())
    with torch.no_grad():
        t2.weight[0, 0] += 1e-6
    assert loop(tmp_path, frozen={"teacher": t2}).key() != base


def test_tensor_hash_reads_raw_bytes_in_chunks():
    t = torch.randn(37, 5, dtype=torch.bfloat16)

    def digest(x, chunk):
        h = hashlib.sha256()
        _hash_tensor(h, "t", x, chunk_bytes=chunk)
        return h.hexdigest()

    assert digest(t, 16) == digest(t, 1 << 20) == digest(t.t().contiguous().t(), 16)  # layout-independent
    u = t.clone()
    u.view(torch.int16)[3, 2] += 1  # one bit of one value
    assert digest(u, 16) != digest(t, 16)
    assert digest(torch.tensor(2.0), 16) != digest(torch.tensor([2.0]), 16)


def other_lr(ck, steps, **kw):
    t = train(steps).model_copy(update={"lr": 2e-2})
    return Loop("tiny", tiny_model(), tiny_data(), kw.pop("loss", None) or Counting(), t, 0, ck,
                **{"checkpoint_every": 2, "keep_checkpoints": 2, "frozen": {}, **kw})


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_longer_run_continues_a_shorter_ones_checkpoints(tmp_path):
    """The prefix rule: 6 steps, then 10 in the same folder, trains steps 6..10 only and ends bit for bit
    where an uninterrupted 10-step run ends (warm-up-then-constant lr, per-step draws)."""
    loop(tmp_path / "ck", steps=6).run()
    loss = Counting()
    lp = loop(tmp_path / "ck", steps=10, loss=loss)
    r = lp.run()
    assert r.steps == 10 and r.prefix_steps == 0 and r.seconds > 0 and r.samples_per_second > 0
    assert loss.calls == 1 + 4  # the gradient probe, then steps 6..10
    fresh = loop(tmp_path / "fresh", steps=10)
    fresh.run()
    assert_same(final(lp), final(fresh))


def test_shorter_run_leaves_a_longer_ones_later_checkpoints_alone(tmp_path):
    """The teacher bug: steps 12 -> 10 resumed the finished 12-step checkpoint and saved it as the 10-step
    model. A checkpoint past this run's total is neither resumed nor deleted (nor set aside)."""
    loop(tmp_path / "ck", steps=12, checkpoint_every=12).run()  # only step-00000012
    later = tree(tmp_path / "ck" / "step-00000012")
    loss = Counting()
    lp = loop(tmp_path / "ck", steps=10, loss=loss, keep_checkpoints=1)
    r = lp.run()
    assert r.steps == 10 and loss.calls == 1 + 10  # from step 0
    assert tree(tmp_path / "ck" / "step-00000012") == later
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["FINGERPRINT", "step-00000010", "step-00000012"]
    fresh = loop(tmp_path / "fresh", steps=10)
    fresh.run()
    assert_same(final(lp), final(fresh))
    again = Counting()
    assert loop(tmp_path / "ck", steps=12, loss=again).run().steps == 12 and again.calls == 1  # its own, resumed


def test_prefix_root_with_the_same_key_is_copied_and_continued(tmp_path, capfd):
    prefix = tmp_path / "prefix"
    loop(prefix, steps=6).run()
    before = tree(prefix)
    loss = Counting()
    lp = loop(tmp_path / "ck", steps=10, loss=loss, prefixes=[tmp_path / "absent", prefix])
    r = lp.run()
    assert loss.calls == 1 + 4 and r.steps == 10 and r.prefix_steps == 6
    assert f"took prefix {prefix / 'step-00000006'}" in capfd.readouterr().out
    assert tree(prefix) == before  # read, never moved or changed
    fresh = loop(tmp_path / "fresh", steps=10)
    fresh.run()
    assert_same(final(lp), final(fresh))
    # the run's own checkpoints, further along than the prefix, are kept: a rerun trains nothing
    again = Counting()
    assert loop(tmp_path / "ck", steps=10, loss=again, prefixes=[prefix]).run().prefix_steps == 6
    assert again.calls == 1
    # a prefix at the run's whole length: nothing trained
    whole = Counting()
    r = loop(tmp_path / "whole", steps=6, loss=whole, prefixes=[prefix]).run()
    assert whole.calls == 1 and r.steps == 6 and r.prefix_steps == 6 and r.seconds > 0


def test_prefix_root_with_another_key_is_ignored(tmp_path, capfd):
    prefix = tmp_path / "prefix"
    other_lr(prefix, 6).run()
    before = tree(prefix)
    loss = Counting()
    lp = loop(tmp_path / "ck", steps=10, loss=loss, prefixes=[prefix])
    r = lp.run()
    assert loss.calls == 1 + 10 and r.prefix_steps == 0  # from step 0
    assert f"prefix {prefix}: another key" in capfd.readouterr().out
    assert tree(prefix) == before
    fresh = loop(tmp_path / "fresh", steps=10)
    fresh.run()
    assert_same(final(lp), final(fresh))


def test_changed_frozen_model_does_not_resume(tmp_path):
    """The stage-1 bug: a retrained teacher left stage 1 'resuming' its finished checkpoint."""
    t1, t2 = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    a = loop(tmp_path / "ck", loss=Counting(t1), frozen={"teacher": t1})
    a.run()
    loss = Counting(t2)
    b = loop(tmp_path / "ck", loss=loss, frozen={"teacher": t2})
    b.run()
    assert loss.calls == 1 + 4
    c = loop(tmp_path / "fresh", loss=Counting(t2), frozen={"teacher": t2})
    c.run()
    assert_same(final(b), final(c))


def test_finished_run_returns_the_figures_of_the_run_that_trained_it(tmp_path):
    first = loop(tmp_path).run()
    loss = Counting()
    again = loop(tmp_path, loss=loss)
    second = again.run()
    assert loss.calls == 1  # the probe only: nothing trained
    assert second == first and first.seconds > 0 and first.samples_per_second > 0 and "loss" in first.last


def test_kill_and_resume_equals_uninterrupted(tmp_path):
    full = loop(tmp_path / "full", steps=6)
    full.run()
    r = loop(tmp_path / "res", steps=6, max_steps_this_run=3).run()
    assert r.steps == 3
    resumed = loop(tmp_path / "res", steps=6)
    assert resumed.run().steps == 6
    assert_same(final(full), final(resumed))


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_last_checkpoint_is_set_aside_and_the_previous_one_used(tmp_path, capfd, damage):
    full = loop(tmp_path / "full", steps=6, checkpoint_every=3)
    full.run()
    loop(tmp_path / "ck", steps=6, checkpoint_every=3, max_steps_this_run=5).run()  # steps 3 and 5
    bad = tmp_path / "ck" / "step-00000005" / "model.safetensors"
    data = bad.read_bytes()
    bad.write_bytes(data[:len(data) // 2] if damage == "truncate" else os.urandom(len(data)))
    capfd.readouterr()
    loss = Counting()
    lp = loop(tmp_path / "ck", steps=6, checkpoint_every=3, loss=loss)
    lp.run()
    err = capfd.readouterr().err
    assert str(tmp_path / "ck" / "step-00000005") in err and "step-00000005.corrupt" in err
    assert (tmp_path / "ck" / "step-00000005.corrupt" / "model.safetensors").exists()
    assert loss.calls == 1 + 3  # resumed from step 3
    assert_same(final(lp), final(full))


def checkpoint(root: Path, step: int, readable: bool = True) -> Path:
    """A complete checkpoint folder as _save leaves it (weights and DONE), or one with truncated weights."""
    ck = root / f"step-{step:08d}"
    ck.mkdir(parents=True)
    save_file({"w": torch.full((4,), float(step))}, str(ck / "model.safetensors"))
    if not readable:
        (ck / "model.safetensors").write_bytes((ck / "model.safetensors").read_bytes()[:20])
    (ck / "DONE").write_text(json.dumps({"step": step}))
    return ck


def test_claim_sets_aside_an_unreadable_newest_and_claims_the_previous(tmp_path, capfd):
    root = tmp_path / "ck"
    root.mkdir()
    (root / "FINGERPRINT").write_text("k")
    two = checkpoint(root, 2)
    for step in (4, 5, 9):
        checkpoint(root, step, readable=False)
    assert _claim(root, "k", 6) == (two, False)
    assert sorted(p.name for p in root.iterdir()) == [
        "FINGERPRINT", "step-00000002", "step-00000004.corrupt", "step-00000005.corrupt", "step-00000009"]
    assert "step-00000005.corrupt" in capfd.readouterr().err
    assert (root / "step-00000009" / "model.safetensors").stat().st_size == 20  # a longer run's: not touched
    assert _claim(root, "k", 6) == (two, False)  # claiming again changes nothing


def test_claim_does_not_claim_another_keys_checkpoints(tmp_path):
    root = tmp_path / "ck"
    root.mkdir()
    (root / "FINGERPRINT").write_text("other")
    checkpoint(root, 2)
    assert _claim(root, "k", 6) == (None, True)  # removed, not resumed
    assert sorted(p.name for p in root.iterdir()) == ["FINGERPRINT"] and (root / "FINGERPRINT").read_text() == "k"
    unmarked = tmp_path / "unmarked"
    checkpoint(unmarked, 2)
    assert _claim(unmarked, "k", 6) == (None, True)  # no key: nobody's
    assert _claim(tmp_path / "new", "k", 6) == (None, False) and (tmp_path / "new" / "FINGERPRINT").read_text() == "k"


def test_corrupt_only_checkpoint_starts_afresh(tmp_path):
    loop(tmp_path / "ck", max_steps_this_run=2).run()
    (tmp_path / "ck" / "step-00000002" / "model.safetensors").write_bytes(b"\0" * 100)
    loss = Counting()
    lp = loop(tmp_path / "ck", loss=loss)
    lp.run()
    assert loss.calls == 1 + 4 and (tmp_path / "ck" / "step-00000002.corrupt").is_dir()
    fresh = loop(tmp_path / "fresh")
    fresh.run()
    assert_same(final(lp), final(fresh))


CHILD = """
import sys, time, torch
from pathlib import Path
from pipeline.config import TrainLoop
from pipeline.training import Loop

ready = Path(sys.argv[1])
def loss_fn(model, batch, gen):
    ready.write_text("training")
    time.sleep(600)
model = torch.nn.Linear(2, 1)
Loop("orphan", model, {"x": torch.zeros(4, 2)}, loss_fn, TrainLoop(steps=1, batch_size=2, lr=1e-3, warmup_steps=0,
     weight_decay=0.0, max_grad_norm=1.0), 0, Path(sys.argv[2])).run()
"""

PARENT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], *sys.argv[2:]])
print(child.pid, flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")  # a zombie has exited; whether anyone reaps it is not ours


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_training_process_dies_with_its_parent(tmp_path):
    """Killing `dvc` (the parent) must not leave the training process racing a rerun."""
    ready = tmp_path / "ready"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    parent = subprocess.Popen([sys.executable, "-c", PARENT, CHILD, str(ready), str(tmp_path / "ck")],
                              stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)
    child = int(parent.stdout.readline())
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():  # the child is inside Loop.run
            assert _alive(child) and time.monotonic() < deadline, "the child never reached its training step"
            time.sleep(0.2)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 30
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(child), "the training process outlived its killed parent"
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)
        parent.kill()


def test_parameters_without_gradient_are_frozen(tmp_path):
    """DDP fails at step 2 on a trainable parameter that never gets a gradient; Loop freezes them."""
    model = torch.nn.ModuleDict({"used": torch.nn.Linear(3, 2), "unused": torch.nn.Linear(3, 2)})
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def loss_fn(m, batch, gen):
        return {"loss": torch.nn.functional.mse_loss(m["used"](batch["x"]), batch["y"])}

    lp = Loop("tiny", model, tiny_data(), loss_fn, train(2), 0, tmp_path)
    lp.run()
    assert [k for k, p in model.named_parameters() if not p.requires_grad] == ["unused.weight", "unused.bias"]
    assert torch.equal(model["unused"].weight, before["unused.weight"])
    assert not torch.equal(model["used"].weight, before["used.weight"])


def ema_loop(ck, **kw):
    return loop(ck, steps=6, ema_decay=0.9, checkpoint_every=1, keep_checkpoints=100, **kw)


def test_ema_weights_are_diffusers_ema_of_the_trained_weights(tmp_path):
    lp = ema_loop(tmp_path)
    init = [p.detach().clone() for p in lp.model.parameters()]
    lp.run()
    # Replay diffusers' EMAModel (with warm-up) over the raw weights of every step's checkpoint.
    params = [torch.nn.Parameter(p.clone()) for p in init]
    ema = EMAModel(params, decay=0.9, use_ema_warmup=True)
    names = [k for k, _ in lp.model.named_parameters()]
    for step in range(1, 7):
        raw = load_file(str(tmp_path / f"step-{step:08d}" / "model.safetensors"))
        with torch.no_grad():
            for p, k in zip(params, names):
                p.copy_(raw[k])
        ema.step(params)
    for k, p, s in zip(names, lp.model.parameters(), ema.shadow_params):
        assert torch.allclose(p, s, atol=1e-7, rtol=0), k
        assert not torch.equal(p, raw[k]), k  # the saved weights are the average, not the last step's


def test_ema_resume_equals_uninterrupted(tmp_path):
    full = ema_loop(tmp_path / "full")
    full.run()
    ema_loop(tmp_path / "res", max_steps_this_run=4).run()
    resumed = ema_loop(tmp_path / "res")
    resumed.run()
    assert_same(final(full), final(resumed))


def test_key_changes_with_the_project_code_not_its_comments(monkeypatch):
    """A stage DVC reruns because its code changed must not resume the old code's checkpoints; a comment or
    docstring edit (which reruns no stage) keeps them."""
    from pipeline import closure, training

    before = training.code_digest()
    src = Path(training.__file__).resolve()
    real = Path.read_text

    def digest_with(suffix: str) -> str:
        monkeypatch.setattr(Path, "read_text", lambda p, *a, **k: real(p, *a, **k) + (suffix if p.resolve() == src else ""))
        monkeypatch.setattr(closure, "_MEMO", {})   # the file's mtime did not change
        return training.code_digest()

    assert digest_with("\n# a comment\n") == before
    assert digest_with("\nEDITED = 1\n") != before


def test_reported_seconds_are_the_time_spent_training(tmp_path):
    """Each checkpoint stores the seconds trained so far: saving several must not count the same time twice."""
    import time

    class Slow(Counting):  # training time, not set-up, dominates the wall time
        def __call__(self, model, batch, gen):
            time.sleep(0.05)
            return super().__call__(model, batch, gen)

    lp = loop(tmp_path / "ck", steps=8, checkpoint_every=1, loss=Slow())
    t0 = time.perf_counter()
    result = lp.run()
    wall = time.perf_counter() - t0
    assert 0 < result.seconds <= wall


def test_closure_code_digest_ignores_what_else_the_process_loaded(monkeypatch):
    """distill_stage1 and an ablation run import different stage modules: keyed on the trainer's import
    closure, their stage-1 runs still share a key (and checkpoints)."""
    import types

    from pipeline import training

    for name, mod in list(sys.modules.items()):   # other tests may have imported the stage modules
        if getattr(mod, "__file__", None) == str(REPO / "stages" / "ablate_stage1.py"):
            monkeypatch.delitem(sys.modules, name)
    closure, loaded = training.code_digest(("pipeline.training",)), training.code_digest()
    fake = types.ModuleType("fake_stage")
    fake.__file__ = str(REPO / "stages" / "ablate_stage1.py")
    monkeypatch.setitem(sys.modules, "fake_stage", fake)
    assert training.code_digest(("pipeline.training",)) == closure
    assert training.code_digest() != loaded
