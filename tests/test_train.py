import pytest
import torch

from overtok.optim import lr_at
from overtok.tracking import Sink
from overtok.train import TrainingDiverged, train
from tests.conftest import tiny_config


class Recorder(Sink):
    def __init__(self):
        self.points = []

    def log(self, metrics, step):
        self.points.extend((k, step, v) for k, v in metrics.items())

    def curve(self, key):
        return [(s, v) for k, s, v in self.points if k == key]


def test_resume_reproduces_the_uninterrupted_curve(tmp_path):
    common = {"train.max_steps": 20, "train.log_every": 1, "train.checkpoint_every": 10, "model.oe.n": 2,
              "model.oe.m": 50, "model.od_depth": 2}
    full = Recorder()
    train(tiny_config(**common, **{"train.checkpoint_dir": str(tmp_path / "a")}), full)

    broken = Recorder()
    with pytest.raises(RuntimeError, match="deliberate"):
        train(tiny_config(**common, **{"train.checkpoint_dir": str(tmp_path / "b"), "runtime.fail_at_step": 15}), broken)
    resumed = Recorder()
    train(tiny_config(**common, **{"train.checkpoint_dir": str(tmp_path / "b")}), resumed)

    # the resumed run replays the checkpointed curve (steps 1-10) and continues it: bitwise equal losses at the
    # same token counts as the uninterrupted run, no gap, no duplicate
    assert resumed.curve("train/loss") == full.curve("train/loss")
    assert [s for s, _ in broken.curve("train/loss")] == [tiny_config().tokens_per_step * i for i in range(1, 16)]
    assert full.curve("val/loss") == resumed.curve("val/loss")


def test_nan_loss_raises_with_step(tmp_path):
    cfg = tiny_config(**{"train.lr": 1e12, "train.grad_clip": 0.0, "train.warmup_steps": 0, "train.log_every": 1,
                         "train.checkpoint_dir": str(tmp_path)})
    with pytest.raises(TrainingDiverged) as e:
        train(cfg)
    assert e.value.step >= 1 and ("nan" in str(e.value) or "inf" in str(e.value))


@pytest.mark.parametrize("dtype, residual, expect", [("bfloat16", "bfloat16", 1.0), ("float32", "bfloat16", 0.0),
                                                     ("bfloat16", "float32", 0.0)])
def test_bf16_residual_runs_and_is_recorded(tmp_path, dtype, residual, expect):
    """train.residual_dtype takes effect under bf16 autocast only (here the CPU's), and every run says which ran."""
    rec = Recorder()
    train(tiny_config(**{"train.max_steps": 6, "train.log_every": 3, "train.dtype": dtype, "train.residual_dtype": residual,
                         "train.checkpoint_dir": str(tmp_path)}), rec)
    assert [v for _, v in rec.curve("perf/residual_bf16")] == [expect, expect]
    losses = [v for _, v in rec.curve("train/loss")]
    assert len(losses) == 2 and all(0 < v < 20 for v in losses)


def test_checkpointed_optimizer_state_holds_a_step_graphs_learning_rate_as_a_number(tmp_path):
    """A step graph (overtok.engine.StepGraph, CUDA only) has AdamW read its learning rate from a tensor; checkpoints
    keep the number (and capturable off), so a run without step graphs resumes from them, and with them again."""
    from overtok.optim import optimizer_state

    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=1e-3)
    p.grad = torch.full((3,), 0.5)
    opt.step()
    opt.param_groups[0]["lr"], opt.param_groups[0]["capturable"] = torch.tensor(2.5e-4), True
    path = tmp_path / "opt.pt"
    torch.save(optimizer_state(opt), path)
    state = torch.load(path, weights_only=True)
    lr = float(torch.tensor(2.5e-4))  # the float32 the tensor holds
    assert state["param_groups"][0]["lr"] == lr and type(state["param_groups"][0]["lr"]) is float
    assert state["param_groups"][0]["capturable"] is False
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)  # the live optimizer keeps its tensor
    fresh = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))], lr=1e-3)
    fresh.load_state_dict(state)
    assert fresh.param_groups[0]["lr"] == lr and int(fresh.state[fresh.param_groups[0]["params"][0]]["step"]) == 1


def test_step_graph_scope_needs_cuda_and_says_where_it_ran(tmp_path):
    """runtime.cuda_graph_scope = step on the CPU: the run trains as usual and records that no step graph ran."""
    rec = Recorder()
    train(tiny_config(**{"train.max_steps": 6, "train.log_every": 3, "runtime.compile": False,
                         "runtime.cuda_graph_scope": "step", "train.checkpoint_dir": str(tmp_path)}), rec)
    assert [v for _, v in rec.curve("perf/step_graph")] == [0.0, 0.0]


def test_schedules():
    t = tiny_config(**{"train.max_steps": 100, "train.warmup_steps": 10, "train.lr": 1.0, "train.min_lr_ratio": 0.1}).train
    assert lr_at(0, t) == pytest.approx(0.1) and lr_at(9, t) == pytest.approx(1.0)
    assert lr_at(100, t) == pytest.approx(0.1) and 0.1 < lr_at(55, t) < 1.0
    t.schedule = "wsd"
    assert lr_at(50, t) == 1.0 and lr_at(100, t) == pytest.approx(0.1) and lr_at(90, t) == pytest.approx(0.55)


def test_train_cli_logs_a_falling_curve_to_mlflow(cli, tmp_path):
    res = cli("train", "--set", "train.max_steps=60", "--set", "train.log_every=5", "--set", "train.gen_samples=4",
              "--set", "model.oe.n=2", "--set", "model.oe.m=1000", "--set", "name=clitest")
    assert res.returncode == 0, res.stderr[-2000:]
    from overtok.tracking import client

    c = client(f"sqlite:///{tmp_path}/results/mlflow.db")
    exp = c.get_experiment_by_name("overtok")
    runs = c.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run = runs[0]
    assert run.data.params["model.oe.m"] == "1000" and "params.oe_tables" in run.data.params
    hist = sorted(c.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)
    assert len(hist) == 12 and hist[0].step == tiny_tokens(run) * 5
    assert hist[-1].value < hist[0].value - 0.3
    assert "val/gen_acc" in run.data.metrics
    arts = [a.path for a in c.list_artifacts(run.info.run_id)]
    assert "config.json" in arts
    # artifacts live next to the SQLite store, not in ./mlruns of whatever directory the command ran in
    assert (tmp_path / "results" / "mlartifacts" / run.info.run_id / "artifacts" / "config.json").is_file()
    assert not (tmp_path / "mlruns").exists()


def tiny_tokens(run):
    return int(run.data.params["tokens_per_step"])


def test_failed_run_is_recorded(cli, tmp_path):
    res = cli("train", "--set", "train.max_steps=10", "--set", "runtime.fail_at_step=3", "--set", "train.gen_samples=0")
    assert res.returncode != 0
    from overtok.tracking import client

    c = client(f"sqlite:///{tmp_path}/results/mlflow.db")
    run = c.search_runs([c.get_experiment_by_name("overtok").experiment_id])[0]
    assert run.info.status == "FAILED" and "fail_at_step=3" in run.data.tags["overtok.error"]


def test_validation_builds_no_autograd_graph():
    # a decorator once slipped off eval_loss: validation then saved every activation for a backward never run
    # (and, with CUDA graphs, left a pending backward that took the graphs off their fast path)
    import contextlib

    import torch

    from overtok.data.batches import Batches
    from overtok.model import Transformer
    from overtok.train import eval_loss

    cfg = tiny_config()
    model = Transformer(cfg.model)
    seen = []
    model.norm.register_forward_hook(lambda mod, args, out: seen.append(out.requires_grad))
    loss = eval_loss(model, Batches(cfg, "val"), 2, torch.device("cpu"), contextlib.nullcontext)
    assert seen == [False, False] and loss > 0 and model.training


def test_evaluation_runs_eagerly_unless_it_pays_to_compile_it():
    """runtime.compile_eval: with 'auto' a run that evaluates few batches runs them eagerly (no second compilation for
    the forward without gradients); the compiled evaluation gives the same loss."""
    import contextlib

    import torch
    from torch._dynamo.utils import counters

    from overtok.config import RunConfig, RuntimeConfig, TrainConfig
    from overtok.data.batches import Batches
    from overtok.engine import EVAL_COMPILE_MIN_BATCHES, compiled_eval
    from overtok.model import Transformer
    from overtok.train import eval_loss

    def run(train: dict, **runtime) -> RunConfig:
        return RunConfig(train=TrainConfig(**train), runtime=RuntimeConfig(**{"compile": True, **runtime}))

    few = dict(max_steps=1000, eval_every=250, eval_batches=4)  # 16 batches in all
    many = dict(max_steps=1000, eval_every=10, eval_batches=EVAL_COMPILE_MIN_BATCHES // 100)
    assert not compiled_eval(run(few)) and compiled_eval(run(many))
    assert compiled_eval(run(few, compile_eval="always"))
    assert not compiled_eval(run(many, compile_eval="never"))
    assert not compiled_eval(run(many, compile=False, compile_eval="always"))

    cfg = tiny_config()
    model = Transformer(cfg.model)
    model.body_and_loss = torch.compile(model.body_and_loss, backend="aot_eager")
    model(Batches(cfg, "train").next())[1]["total"].backward()
    graphs = counters["stats"]["unique_graphs"]
    eager = eval_loss(model, Batches(cfg, "val"), 2, torch.device("cpu"), contextlib.nullcontext, compiled=False)
    assert counters["stats"]["unique_graphs"] == graphs, "the eager evaluation compiled a graph"
    compiled = eval_loss(model, Batches(cfg, "val"), 2, torch.device("cpu"), contextlib.nullcontext, compiled=True)
    assert counters["stats"]["unique_graphs"] == graphs + 1, "the compiled evaluation did not compile its own graph"
    assert abs(eager - compiled) < 1e-5
