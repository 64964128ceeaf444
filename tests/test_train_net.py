"""tools/train_net.py on a few-iteration slice of the toy setup: the optimiser recipe, 2-process
CPU (gloo) training through Detectron2's launch, and resuming a run that was really killed."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from petr_testing import REPO_ROOT, load_cfg, shrink_cfg

from petr.data.synthetic import random_person_batch
from petr.engine import PETRTrainer, build_petr_optimizer

TRAIN_NET = os.path.join(REPO_ROOT, "tools", "train_net.py")
# a small slice of the toy setup: tiny images, few queries, no periodic evaluation
FAST_OPTS = [
    "INPUT.MIN_SIZE_TRAIN", "(128, 160)", "INPUT.MAX_SIZE_TRAIN", "192",
    "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "192",
    "MODEL.PETR.NUM_QUERIES", "10", "TEST.DETECTIONS_PER_IMAGE", "5",
    "MODEL.PETR.ENC_LAYERS", "1",
    "SOLVER.IMS_PER_BATCH", "2", "TEST.EVAL_PERIOD", "0",
]  # fmt: skip


@pytest.fixture(scope="module")
def toy_env(tmp_path_factory):
    env = dict(os.environ)
    env.update(
        PETR_TOY_CACHE=str(tmp_path_factory.mktemp("toy_cache")),
        PETR_TOY_NUM_TRAIN="12",
        PETR_TOY_NUM_VAL="4",
        OMP_NUM_THREADS="1",
    )
    return env


def _train_cmd(output_dir, *extra):
    return [sys.executable, TRAIN_NET, "--config-file", "configs/petr_toy.yaml", *extra,
            *FAST_OPTS, "OUTPUT_DIR", str(output_dir)]  # fmt: skip


def test_optimizer_follows_the_official_recipe():
    cfg = shrink_cfg(load_cfg("petr_R50.yaml"))
    cfg.DATASETS.TRAIN = cfg.DATASETS.TEST = ()
    model = PETRTrainer.build_model(cfg)
    opt = build_petr_optimizer(cfg, model)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    base = cfg.SOLVER.BASE_LR
    names = dict(model.named_parameters())
    for name, p in names.items():
        if not p.requires_grad:
            assert id(p) not in lr_of  # frozen stem / res2
            continue
        slow = name.startswith("backbone.") or "sampling_offsets" in name
        assert lr_of[id(p)] == pytest.approx(base * (0.1 if slow else 1.0)), name
    assert all(g["weight_decay"] == cfg.SOLVER.WEIGHT_DECAY for g in opt.param_groups)
    assert isinstance(opt, torch.optim.AdamW)

    # global-norm clipping at 0.1 over all parameters, before the update
    losses = model(random_person_batch(17, [(96, 128)], [2]))
    (sum(losses.values()) * 1e3).backward()
    opt.step()
    grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    assert total.item() == pytest.approx(0.1, rel=1e-3)


@pytest.mark.slow
def test_two_process_cpu_training(tmp_path, toy_env):
    out = tmp_path / "ddp"
    cmd = _train_cmd(out, "--num-gpus", "2", "SOLVER.MAX_ITER", "3")
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=toy_env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (out / "log.txt").read_text()
    assert "Rank of current process: 0. World size: 2" in log
    assert "Overall training speed: 1 iterations" in log or "iter: 2" in log
    final = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)
    assert final["iteration"] == 2


@pytest.mark.slow
def test_killed_run_resumes_from_its_last_checkpoint(tmp_path, toy_env):
    out = tmp_path / "resume"
    schedule = ["SOLVER.MAX_ITER", "20", "SOLVER.STEPS", "(15,)", "SOLVER.CHECKPOINT_PERIOD", "2"]
    cmd = _train_cmd(out, *schedule)
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=toy_env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    ckpt = out / "model_0000003.pth"  # written after iteration 3 (the 4th)
    deadline = time.time() + 600
    try:
        while _tagged_iteration(out) < 3:  # polling may miss the moment the tag says 3
            assert proc.poll() is None, "training exited before it could be killed"
            assert time.time() < deadline, "no checkpoint after 10 minutes"
            time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)

    # the state `--resume` restores, inspected in-process
    cfg = load_cfg("petr_toy.yaml")
    cfg.merge_from_list(FAST_OPTS + schedule + ["OUTPUT_DIR", str(out)])
    cfg.DATASETS.TRAIN = ("petr_toy_train",)
    trainer = _trainer_without_data(cfg)
    trainer.resume_or_load(resume=True)
    # The kill may land while a newer checkpoint file is half-written; Detectron2 tags a file as
    # the last checkpoint only after writing it, and that tag is what `--resume` follows.
    last = _tagged_iteration(out)
    assert last < 19, "the run finished before it was killed"
    assert trainer.start_iter == last + 1 >= saved["iteration"] + 1
    restored = torch.load(out / f"model_{last:07d}.pth", map_location="cpu", weights_only=True)
    # Detectron2 keeps the scheduler in its LRScheduler hook, the optimizer in the step runner
    assert trainer.iter == restored["iteration"] == last
    assert trainer.scheduler.state_dict() == restored["trainer"]["hooks"]["LRScheduler"]
    assert trainer.scheduler.last_epoch == last + 1
    opt_state = trainer.optimizer.state_dict()["state"]
    saved_opt = restored["trainer"]["_trainer"]["optimizer"]
    assert len(saved_opt["state"]) == len(opt_state) > 0
    for k, v in saved_opt["state"].items():
        torch.testing.assert_close(opt_state[k]["exp_avg"], v["exp_avg"])
        assert opt_state[k]["step"] == v["step"]
    model_state = trainer.model.state_dict()
    for k, v in restored["model"].items():
        torch.testing.assert_close(model_state[k], v)

    # and the real restart continues from there to the end
    cmd = _train_cmd(out, "--resume", *schedule)
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=toy_env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (out / "log.txt").read_text()
    assert f"Starting training from iteration {last + 1}" in log
    assert (
        torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)["iteration"]
        == 19
    )


def _tagged_iteration(output_dir):
    """Iteration of the checkpoint named in `last_checkpoint` (-1 before the first one)."""
    tag = output_dir / "last_checkpoint"
    name = tag.read_text().strip() if tag.exists() else ""
    if not (name.startswith("model_0") and name.endswith(".pth")):
        return -1
    return int(name[len("model_") : -len(".pth")])


def _trainer_without_data(cfg):
    """A PETRTrainer whose data loader is never started: only the restored state is inspected."""
    from unittest import mock

    with mock.patch.object(PETRTrainer, "build_train_loader", return_value=iter(())):
        return PETRTrainer(cfg)


def test_checkpointer_loads_weights_for_eval(tmp_path):
    cfg = shrink_cfg(load_cfg("petr_R50.yaml"))
    cfg.DATASETS.TRAIN = cfg.DATASETS.TEST = ()
    a = PETRTrainer.build_model(cfg)
    DetectionCheckpointer(a, save_dir=str(tmp_path)).save("w")
    cfg.MODEL.WEIGHTS = str(tmp_path / "w.pth")
    b = PETRTrainer.build_model(cfg)
    DetectionCheckpointer(b).resume_or_load(cfg.MODEL.WEIGHTS, resume=False)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
