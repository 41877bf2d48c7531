"""End-to-end sweeps: real local Ray, real MLflow (SQLite store and an `mlflow server`), real processes."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import ROOT, SHARED
from tests.sweeplib import (
    SMALL,
    env,
    free_port,
    group_alive,
    kill_group,
    listening_sockets_of_tree,
    mlflow_server,
    overtok,
    start_sweep,
    stop_processes_mentioning,
    sweep_output_after_kill,
    sweep_runs,
    sweep_with_and_without_reuse,
    wait_for,
    write,
)

pytestmark = pytest.mark.slow

FAIL_SWEEP = """
name: failing
base:
  model: {d_model: 32, n_layers: 1, n_heads: 2, seq_len: 32}
  data: {batch_size: 4}
  train: {max_steps: 20, eval_every: 10, log_every: 5, checkpoint_every: 10, gen_samples: 0}
zip:  # a runtime field is not part of the trial id: the failing trials differ in the learning rate too
  - {runtime.fail_at_step: [-1, 7], train.lr: [1e-3, 2e-3]}
grid:
  model.od_depth: [1, 2]
max_concurrent: 2
"""


def test_quickstart_end_to_end(quickstart):
    work, res, _ = quickstart
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    c, parents, children = sweep_runs(f"sqlite:///{work}/results/mlflow.db", "quickstart")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 12 and all(r.info.status == "FINISHED" for r in children)
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    assert len({r.data.tags["overtok.trial_id"] for r in children}) == 12
    r = children[0]
    assert {"varied.model.oe.n", "varied.model.od_depth", "varied.model.d_model"} <= set(r.data.params)
    hist = sorted(c.get_metric_history(r.info.run_id, "train/loss"), key=lambda m: m.step)
    tps = int(r.data.params["tokens_per_step"])
    assert [m.step for m in hist] == [tps * s for s in (5, 10, 15, 20)]
    assert "val/gen_acc" in r.data.metrics and "done 12/12" in res.stdout
    # where the time went: the trainer's setup and first step per run, the driver's phases at the end
    assert r.data.metrics["perf/setup_s"] > 0 and r.data.metrics["perf/first_step_s"] > 0
    assert [m.step for m in c.get_metric_history(r.info.run_id, "perf/setup_s")] == [tps * 5]
    assert re.search(r"quickstart: [0-9.]+ s in all: checks [0-9.]+ s, setup [0-9.]+ s, trials [0-9.]+ s, Ray stop "
                     r"[0-9.]+ s", res.stdout)


def test_rerun_starts_nothing_new(quickstart):
    work, _, _ = quickstart
    ray_tmp = work / "raytmp"  # where Ray would put its session, had it started
    res = overtok(work, "sweep", "quickstart.yaml", *[f"--set={s}" for s in SMALL], env={"RAY_TMPDIR": str(ray_tmp)})
    assert res.returncode == 0, res.stderr[-2000:]
    assert "12 already finished, 0 to run" in res.stdout
    assert not ray_tmp.exists()  # a finished sweep is answered from the store without starting Ray
    _, parents, children = sweep_runs(f"sqlite:///{work}/results/mlflow.db", "quickstart")
    assert len(parents) == 1 and len(children) == 12


def test_a_bad_corpus_found_while_ray_starts_exits_2_and_starts_no_trial(tmp_path):
    """The driver tokenizes corpora in a thread while Ray starts: a data error still ends the command with one
    line and exit 2, before any trial."""
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_bytes(b"fine text\n\xff\xfe not text\n")
    write(tmp_path / "bad.yaml", f"""
name: badcorpus
base:
  model: {{d_model: 32, n_layers: 1, n_heads: 2, seq_len: 32}}
  data: {{kind: text, corpus: corpus, tokenizer: {SHARED / "tokenizers" / "gpt-neox-olmo.json"}, batch_size: 4}}
  train: {{max_steps: 5, eval_every: 5, log_every: 5, gen_samples: 0}}
seeds: [0]
""")
    res = overtok(tmp_path, "sweep", "bad.yaml")
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1] == f"overtok: error: {tmp_path}/corpus/a.txt: not UTF-8 text (invalid byte at offset 10)"
    _, _, children = sweep_runs(f"sqlite:///{tmp_path}/results/mlflow.db", "badcorpus")
    assert children == []


def test_the_finished_sweep_probe_reads_the_store_as_mlflow_does(quickstart):
    """The driver's quick SQLite probe (no MLflow import) only says "all finished" when MLflow would."""
    from overtok.sweep import load_sweep
    from overtok.tune import _probably_all_finished

    work, _, _ = quickstart
    uri = f"sqlite:///{work}/results/mlflow.db"
    sets = list(SMALL)
    assert _probably_all_finished(load_sweep(str(work / "quickstart.yaml"), sets), uri)
    assert not _probably_all_finished(load_sweep(str(work / "quickstart.yaml"), sets + ["seeds=[0,7]"]), uri)
    assert not _probably_all_finished(load_sweep(str(work / "quickstart.yaml"), sets + ["name=other"]), uri)
    assert not _probably_all_finished(load_sweep(str(work / "quickstart.yaml"), sets), f"sqlite:///{work}/none.db")
    assert not _probably_all_finished(load_sweep(str(work / "quickstart.yaml"), sets), "http://127.0.0.1:1")


def test_failing_trial_is_failed_while_others_finish(tmp_path):
    write(tmp_path / "failing.yaml", FAIL_SWEEP)
    res = overtok(tmp_path, "sweep", "failing.yaml")
    assert res.returncode == 1
    _, parents, children = sweep_runs(f"sqlite:///{tmp_path}/results/mlflow.db", "failing")
    status = {(r.data.params["runtime.fail_at_step"], r.data.params["model.od_depth"]): r.info.status for r in children}
    assert status == {("-1", "1"): "FINISHED", ("-1", "2"): "FINISHED", ("7", "1"): "FAILED", ("7", "2"): "FAILED"}
    failed = [r for r in children if r.info.status == "FAILED"]
    assert all("fail_at_step=7" in r.data.tags["overtok.error"] for r in failed)
    assert parents[0].info.status == "FAILED"


def test_sigkill_driver_then_rerun_finishes_each_trial_once(tmp_path):
    sweep = write(tmp_path / "killme.yaml", """
name: killme
base:
  model: {d_model: 32, n_layers: 2, n_heads: 2, seq_len: 64}
  data: {batch_size: 8}
  train: {max_steps: 400, eval_every: 100, log_every: 10, checkpoint_every: 40, gen_samples: 0}
grid:
  model.oe.n: [1, 2]
  model.oe.m: [200]
max_concurrent: 2
""")
    uri = f"sqlite:///{tmp_path}/results/mlflow.db"
    proc = subprocess.Popen([sys.executable, "-m", "overtok", "sweep", str(sweep)], cwd=tmp_path, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    ckpts = tmp_path / "results" / "ray" / "killme" / "trials"
    try:
        # both trials running, each past its first checkpoint (one trial's two checkpoints are not enough: it could
        # finish before the kill while the other has not started)
        wait_for(lambda: len({p.parent for p in ckpts.glob("*/ckpt_*.pt")}) >= 2, 240, what="checkpoints of both trials")
        time.sleep(1)
        os.kill(proc.pid, signal.SIGKILL)  # the driver only
        proc.wait(10)
    finally:
        kill_group(proc)  # Ray processes the dead driver left behind
    _, _, before = sweep_runs(uri, "killme")
    assert before and all(r.info.status == "RUNNING" for r in before)

    res = overtok(tmp_path, "sweep", str(sweep))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    c, parents, children = sweep_runs(uri, "killme")
    assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children)
    assert {r.info.run_id for r in before} <= {r.info.run_id for r in children}  # resumed, not duplicated
    assert "resumed from" in res.stdout + res.stderr
    for r in children:
        steps = [m.step for m in c.get_metric_history(r.info.run_id, "train/loss")]
        tps = int(r.data.params["tokens_per_step"])
        assert sorted(steps) == [tps * 10 * i for i in range(1, 41)]  # no gap, no duplicate step


def test_sweep_through_mlflow_server(tmp_path):
    with mlflow_server(f"sqlite:///{tmp_path}/server.db", tmp_path / "art") as uri:
        write(tmp_path / "failing.yaml", FAIL_SWEEP.replace("[-1, 7], train.lr: [1e-3, 2e-3]", "[-1], train.lr: [1e-3]"))
        res = overtok(tmp_path, "sweep", "failing.yaml", "--tracking-uri", uri)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        c, parents, children = sweep_runs(uri, "failing")
        assert len(parents) == 1 and len(children) == 2 and all(r.info.status == "FINISHED" for r in children)
        assert not (tmp_path / "results" / "mlflow.db").exists()  # everything went to the server


def test_driver_stop_leaves_no_ray_process():
    """The driver stops its own local Ray with its autoscaler monitor killed first (it has exited when
    ray.shutdown begins, which would otherwise spend a second waiting on it), and every process that Ray started has
    exited when the stop returns."""
    code = ("import json, ray; from overtok.tune import _shutdown_ray\n"
            "ray.init(include_dashboard=False, logging_level='ERROR', num_cpus=1)\n"
            "procs = {k: [i.process for i in v] for k, v in ray._private.worker._global_node.all_processes.items()}\n"
            "seen, shutdown = {}, ray.shutdown\n"
            "def watched():\n"
            "    seen['monitor'] = [p.poll() for p in procs['monitor']]\n"
            "    shutdown()\n"
            "ray.shutdown = watched\n"
            "_shutdown_ray()\n"
            "print(json.dumps({k: [p.poll() for p in v] for k, v in procs.items()}))\n"
            "print(json.dumps(seen))")
    res = subprocess.run([sys.executable, "-c", code], env=env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    exits, seen = (json.loads(line) for line in res.stdout.strip().splitlines()[-2:])
    assert seen["monitor"] and all(code is not None for code in seen["monitor"]), seen
    assert "monitor" in exits and "raylet" in exits and "gcs_server" in exits
    assert all(code is not None for codes in exits.values() for code in codes), exits


def test_sweep_joins_a_two_node_cluster(tmp_path):
    ray = [sys.executable, "-m", "ray.scripts.scripts"]
    port = free_port()
    # token auth stays on; same-machine nodes share ~/.ray/auth_token. The nodes keep their sessions under this test's
    # own temp dir, which names the processes to stop afterwards (never `ray stop`: it would stop every Ray here)
    import tempfile

    ray_tmp = Path(tempfile.mkdtemp(prefix="ot2n", dir="/tmp"))  # short: Ray's socket paths live under it
    e = env({"RAY_AUTH_MODE": "token", "RAY_TMPDIR": str(ray_tmp)})
    try:
        # the cluster recipes' own node commands (docs/cluster/ray_nodes.sh, sourced by slurm_sweep.sh)
        nodes = {**e, "RAY": " ".join(ray), "RAY_PORT": str(port), "RAY_TEMP_DIR": str(ray_tmp)}
        recipe = f"source {ROOT / 'docs' / 'cluster' / 'ray_nodes.sh'}; "
        subprocess.run(["bash", "-c", recipe + "start_head 127.0.0.1 1 0"], env=nodes, check=True, capture_output=True,
                       timeout=120)
        subprocess.run(["bash", "-c", recipe + """start_worker 127.0.0.1 127.0.0.1 2 0 --resources='{"worker_node": 2}'"""],
                       env=nodes, check=True, capture_output=True, timeout=120)
        write(tmp_path / "failing.yaml", FAIL_SWEEP.replace("[-1, 7], train.lr: [1e-3, 2e-3]", "[-1], train.lr: [1e-3]").replace(
            "max_concurrent: 2", "max_concurrent: 2\nresources: {cpu: 1, worker_node: 1}"))
        res = overtok(tmp_path, "sweep", "failing.yaml", "--address", f"127.0.0.1:{port}", env=e)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        import json

        probe = (f"import json, ray; ray.init(address='127.0.0.1:{port}', logging_level='ERROR'); "
                 "print(json.dumps([n['NodeID'] for n in ray.nodes() if 'worker_node' in n['Resources']]))")
        out = subprocess.run([sys.executable, "-c", probe], env=e, capture_output=True, text=True, timeout=120)
        worker = json.loads(out.stdout.strip().splitlines()[-1])
        _, _, children = sweep_runs(f"sqlite:///{tmp_path}/results/mlflow.db", "failing")
        assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children)
        assert {r.data.tags["overtok.node_id"] for r in children} == set(worker)
    finally:
        stop_processes_mentioning(str(ray_tmp))
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_export_fit_plots_on_the_quickstart_sweep(quickstart):
    import json

    import pandas as pd
    from PIL import Image

    work, _, _ = quickstart
    for cmd in ("export", "fit", "plots"):
        res = overtok(work, cmd, "quickstart")
        assert res.returncode == 0, (cmd, res.stdout[-2000:], res.stderr[-2000:])
    out = work / "results" / "quickstart"
    runs, curves = pd.read_parquet(out / "runs.parquet"), pd.read_parquet(out / "curves.parquet")
    assert len(runs) == 12 and (runs.schema_version == 1).all() and (runs.status == "FINISHED").all()
    assert {"trial_id", "variant", "input_vocab_size", "params.body", "params.oe_tables", "flops_per_token",
            "tokens_seen", "final.train/loss", "best.val/loss", "tokens_per_s"} <= set(runs.columns)
    assert set(runs.variant) >= {"Baseline", "OD-2", "OE-400 (2-gram)", "OE-400 (3-gram)"}
    assert set(runs.input_vocab_size) == {7, 7 + 400, 7 + 400 + 402}
    from overtok.identity import code_version

    assert set(runs.code) == {code_version()}  # the trial processes' own hash of the code they ran
    assert {"trial_id", "step", "metric", "value"} <= set(curves.columns)
    assert (curves[curves.metric == "train/loss"].groupby("trial_id").size() == 4).all()
    fitted = json.loads((out / "fits.json").read_text())
    assert set(fitted["loglinear"]["final_train_loss"]) == {"d32-L2", "d64-L3"}
    assert "OE-400 (2-gram)" in fitted["speedup"]["d32-L2"]
    acc = fitted["cfg_generation_accuracy_ci"]["Baseline"]["d32-L2"]
    assert acc["samples"] > 0 and acc["ci95"][0] <= acc["accuracy"] <= acc["ci95"][1]
    for name in ("fig1_loss_vs_size", "fig2_cfg_accuracy", "fig4_curves_speedup", "fig5_loss_vs_vocab", "fig9_loss_diff"):
        png = Image.open(out / "figures" / f"{name}.png")  # drawn: a blank figure has one or two colours
        assert png.mode == "P"  # a 256-colour palette (analysis.commands.save_png), a third of an RGBA file
        assert png.width > 300 and png.height > 200 and len(png.convert("RGB").getcolors(1 << 16)) > 16, name
        assert (out / "figures" / f"{name}.pdf").exists()
    assert "Baseline" in (out / "figures" / "table2.md").read_text()


def test_added_seed_runs_only_new_trials(quickstart):
    work, _, _ = quickstart
    sets = [f"--set={s}" for s in SMALL] + ["--set=seeds=[0, 1]", "--set=grid.model.oe.n=[1]", "--set=grid.model.od_depth=[1]"]
    res = overtok(work, "sweep", "quickstart.yaml", *sets)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "4 trials, 2 already finished, 2 to run" in res.stdout
    _, parents, children = sweep_runs(f"sqlite:///{work}/results/mlflow.db", "quickstart")
    assert len(parents) == 1 and len(children) == 14


def test_export_by_yaml_keeps_only_the_current_trials(quickstart):
    """After the grid changed (a seed was added, other runs exist), exporting by YAML + the same --set keeps exactly
    the trials that file expands to; by name, every run of the sweep."""
    import pandas as pd

    work, _, _ = quickstart
    sets = [f"--set={s}" for s in SMALL] + ["--set=grid.model.oe.n=[1]", "--set=grid.model.od_depth=[1]"]
    res = overtok(work, "export", "quickstart.yaml", *sets)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "are not trials of quickstart.yaml" in res.stdout
    runs = pd.read_parquet(work / "results" / "quickstart" / "runs.parquet")
    assert len(runs) == 2 and set(runs["model.oe.n"]) == {1} and set(runs["model.od_depth"]) == {1}
    everything = overtok(work, "export", "quickstart")
    assert everything.returncode == 0
    assert len(pd.read_parquet(work / "results" / "quickstart" / "runs.parquet")) >= 12


@pytest.mark.parametrize("resources,key,problem", [
    ("{cpu: 1, gpu: 64}", "resources.gpu", "a trial needs 64 GPUs but this machine has"),
    ("{cpu: 4096}", "resources.cpu", "a trial needs 4096 CPUs but this machine has"),
    ("{cpu: 3000, workers: 2}", "resources.cpu", "a trial needs 6000 CPUs (2 workers x 3000)"),
    ("{cpu: 1, tpu_pod: 1}", "resources.tpu_pod", "the custom resource 'tpu_pod', which a local Ray does not have"),
])
def test_sweep_asking_more_than_this_machine_exits_2_and_starts_nothing(tmp_path, resources, key, problem):
    """A new local Ray has this machine's CPUs and GPUs; a trial that needs more would wait forever."""
    write(tmp_path / "big.yaml", f"""
name: big
base:
  model: {{d_model: 32, n_layers: 2, n_heads: 2, seq_len: 32}}
  train: {{max_steps: 5}}
grid:
  model.od_depth: [1, 2]
resources: {resources}
""")
    fresh = {"RAY_TMPDIR": str(tmp_path / "ray_tmp")}  # no Ray instance started here with `ray start`
    res = overtok(tmp_path, "sweep", "big.yaml", env=fresh, timeout=120)
    line = res.stderr.strip()
    assert res.returncode == 2 and "\n" not in line, res.stdout[-2000:] + res.stderr[-2000:]
    assert f"big.yaml:8: {key}: " in line and problem in line, line
    assert not (tmp_path / "results").exists() and not (tmp_path / "ray_tmp").exists()
    assert overtok(tmp_path, "plan", "big.yaml", env=fresh).returncode == 0  # planning works anywhere


def test_two_worker_gloo_ddp_trial(tmp_path):
    """resources.workers: 2 trains the trial data-parallel through Ray Train's TorchTrainer (gloo on CPU), here with
    the OE table sharded row-wise over the two workers (model.oe.shard). Two such trials on 2 CPUs run one at a
    time (Tune alone would start both; the second's workers could not be placed)."""
    import glob

    import torch

    write(tmp_path / "ddp.yaml", """
name: ddp
base:
  model: {d_model: 32, n_layers: 2, n_heads: 2, seq_len: 32, oe: {n: 2, m: 1009, shard: true}}
  data: {batch_size: 4}
  train: {max_steps: 30, eval_every: 10, log_every: 5, checkpoint_every: 10, gen_samples: 0}
grid:
  model.od_depth: [1, 2]
resources: {cpu: 0.9, workers: 2}
max_concurrent: 2
""")
    res = overtok(tmp_path, "sweep", "ddp.yaml")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "world_size=2" in res.stdout + res.stderr
    assert "data-parallel trials (2 workers each): at most 1 at once" in res.stdout, res.stdout[-3000:]
    c, _, children = sweep_runs(f"sqlite:///{tmp_path}/results/mlflow.db", "ddp")
    assert len(children) == 2 and {r.info.status for r in children} == {"FINISHED"}
    # the second trial's coordinating process is the first one's, reused (its TorchTrainer workers are new)
    assert sorted(r.data.tags["overtok.process_trial"] for r in children) == ["1", "2"]
    children = [r for r in children if r.data.params["model.od_depth"] == "1"]
    hist = sorted(c.get_metric_history(children[0].info.run_id, "train/loss"), key=lambda m: m.step)
    per_worker = int(children[0].data.params["tokens_per_step"])
    assert [m.step for m in hist] == [2 * per_worker * 5 * i for i in range(1, 7)]  # global tokens: 2 workers
    assert hist[-1].value < hist[0].value
    state = torch.load(sorted(glob.glob(f"{tmp_path}/results/ray/ddp/trials/*/ckpt_*.pt"))[-1], weights_only=True)
    assert len(state["data_ranks"]) == 2 and state["data_ranks"][0] != state["data_ranks"][1]  # one stream per rank
    assert state["world"] == 2 and glob.glob(f"{tmp_path}/results/ray/ddp/trials/*/shard_*_rank1.pt")  # rank 1's rows


REUSE_SWEEP = """
name: reuse
base:
  model: {d_model: 32, n_layers: 2, n_heads: 2, seq_len: 32, oe: {m: 400}}
  data: {batch_size: 4}
  train: {max_steps: 20, eval_every: 10, log_every: 5, checkpoint_every: 10, gen_samples: 4}
grid:
  model.oe.n: [1, 2]
  model.od_depth: [1, 2]
max_concurrent: 1
reuse_processes: %s
"""


def test_reused_process_trains_each_trial_as_a_new_one(tmp_path):
    """reuse_processes: true (the default) runs trial after trial in one process; the curves equal those of a
    process per trial."""
    runs = sweep_with_and_without_reuse(tmp_path, REUSE_SWEEP, "reuse", 4, ("train/loss", "val/loss", "val/gen_acc"))
    plan = overtok(tmp_path / "false", "plan", "reuse.yaml")
    assert "trial processes: a new one per trial (reuse_processes: false)" in plan.stdout, plan.stdout[-2000:]
    assert len({r.data.tags["overtok.pid"] for r, _ in runs["true"]}) == 1
    assert len({r.data.tags["overtok.pid"] for r, _ in runs["false"]}) == 4
    assert sorted(int(r.data.tags["overtok.process_trial"]) for r, _ in runs["true"]) == [1, 2, 3, 4]
    assert sorted(int(r.data.tags["overtok.process_trial"]) for r, _ in runs["false"]) == [1, 1, 1, 1]
    curves = {reuse: {r.data.tags["overtok.trial_id"]: c for r, c in rs} for reuse, rs in runs.items()}
    assert curves["true"] == curves["false"]


def test_packed_sweep_runs_same_shape_trials_in_one_process(tmp_path):
    """pack: 3 puts trials differing only in seed / lr into one process; each still gets its own MLflow run."""
    write(tmp_path / "packed.yaml", """
name: packed
base:
  model: {d_model: 32, n_layers: 2, n_heads: 2, seq_len: 32}
  data: {batch_size: 4}
  train: {max_steps: 20, eval_every: 10, log_every: 5, checkpoint_every: 10, gen_samples: 4}
grid:
  train.lr: [3e-3, 1e-3]
  model.d_model: [32, 48]
seeds: [0, 1]
pack: 3
max_concurrent: 2
""")
    plan = overtok(tmp_path, "plan", "packed.yaml")
    assert plan.returncode == 0 and "4 packed models, trials per model [3, 3, 1, 1]" in plan.stdout, plan.stdout[-2000:]
    assert "trial processes: reused" in plan.stdout
    res = overtok(tmp_path, "sweep", "packed.yaml")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "8 trials packed into 4 models" in res.stdout
    c, parents, children = sweep_runs(f"sqlite:///{tmp_path}/results/mlflow.db", "packed")
    assert len(children) == 8 and all(r.info.status == "FINISHED" for r in children)
    packs = {}  # a pack is one trial of its (reused) process
    for r in children:
        packs.setdefault((r.data.tags["overtok.pid"], r.data.tags["overtok.process_trial"]), []).append(r)
        hist = sorted(c.get_metric_history(r.info.run_id, "train/loss"), key=lambda m: m.step)
        assert len(hist) == 4 and hist[-1].value < hist[0].value
        assert "val/gen_acc" in r.data.metrics and r.data.params["train.lr"] in ("0.003", "0.001")
    assert sorted(len(v) for v in packs.values()) == [1, 1, 3, 3]
    assert len({pid for pid, _ in packs}) <= 2  # max_concurrent processes, each running pack after pack
    for group in packs.values():  # a pack holds one d_model, several seeds / lrs
        assert len({r.data.params["model.d_model"] for r in group}) == 1
        assert [r.data.metrics.get("perf/pack_size") for r in group] == ([3.0] * 3 if len(group) == 3 else [None])
        assert len({r.data.metrics["perf/first_step_s"] for r in group}) == 1  # one model, one first step
    again = overtok(tmp_path, "sweep", "packed.yaml")
    assert again.returncode == 0 and "8 already finished, 0 to run" in again.stdout


def test_local_cpu_count_is_what_a_new_ray_would_see(tmp_path, monkeypatch):
    """In a container with a CPU quota below os.cpu_count(), a new local Ray has the quota's CPUs (Ray reads the
    cgroup): the check asks Ray's own count and refuses a trial the quota cannot hold. The quota is simulated by
    replacing Ray's count (this machine has none); every other path is the real one."""
    import ray._private.utils as ray_utils

    from overtok.config import ConfigError
    from overtok.sweep import load_sweep

    if (os.cpu_count() or 1) < 2:
        pytest.skip("needs 2 CPUs")
    write(tmp_path / "two.yaml", """
name: two
base:
  model: {d_model: 32, n_layers: 2, n_heads: 2, seq_len: 32}
resources: {cpu: 2}
""")
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "ray_tmp"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    sweep = load_sweep(str(tmp_path / "two.yaml"), [])
    sweep.check_local_resources()  # Ray's count here: the machine's
    monkeypatch.setattr(ray_utils, "get_num_cpus", lambda **kw: 1)
    with pytest.raises(ConfigError, match="a trial needs 2 CPUs but this machine has 1") as e:
        sweep.check_local_resources()
    assert e.value.key == "resources.cpu"


def test_a_local_sweep_listens_on_loopback_only(tmp_path):
    """The Ray a sweep starts for itself (and its workers) listens on 127.0.0.1, never on every interface."""
    write(tmp_path / "lo.yaml", """
name: lo
base:
  model: {d_model: 32, n_layers: 2, n_heads: 2, seq_len: 32}
  train: {max_steps: 3000, log_every: 100, eval_every: 3000, checkpoint_every: 3000, gen_samples: 0}
""")
    home = tmp_path / "home"  # Ray writes the token of a new local cluster (auth on by default) under $HOME
    home.mkdir()
    fresh = {"RAY_TMPDIR": tempfile.mkdtemp(prefix="otlo", dir="/tmp"), "HOME": str(home)}  # nothing to attach to
    proc = subprocess.Popen([sys.executable, "-m", "overtok", "sweep", "lo.yaml"], cwd=tmp_path, env=env(fresh),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    seen = []
    try:
        def raylet_listens():
            seen[:] = listening_sockets_of_tree(proc.pid)
            names = {name for _, _, name in seen}
            return {"raylet", "gcs_server"} <= names and any(n.startswith("ray::") for n in names)

        wait_for(raylet_listens, 180, every=1.0, what="the sweep's Ray and a trial worker listening")
        seen[:] = listening_sockets_of_tree(proc.pid)
    finally:
        kill_group(proc)
        proc.wait(timeout=60)
        stop_processes_mentioning(fresh["RAY_TMPDIR"])
        shutil.rmtree(fresh["RAY_TMPDIR"], ignore_errors=True)
    token = home / ".ray" / "auth_token"
    assert token.is_file() and token.stat().st_mode & 0o777 == 0o600  # the new cluster's credential: owner-only
    loopback = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}
    assert seen and all(addr in loopback for addr, _, _ in seen), seen


@pytest.mark.parametrize("how", ["ctrl-c", "kill", "timeout"])
def test_interrupting_a_sweep_leaves_it_killed_and_resumable(tmp_path, how):
    """While a trial trains: Ctrl-C (SIGINT to the sweep's process group, as a terminal sends it), SIGTERM to the
    driver alone (`kill`) or SIGTERM to the whole group, Ray's processes included (`timeout`, a batch scheduler's time
    limit). Each: exit 130 (Ctrl-C) or 143 (128 + SIGTERM), overtok's own line says how to resume, Tune's
    Tuner.restore hint is not printed, the trial's run is KILLED (not left RUNNING), and no process of the sweep's
    group is left."""
    write(tmp_path / "cc.yaml", """
name: cc
base:
  model: {d_model: 32, n_layers: 2, n_heads: 2, seq_len: 32}
  train: {max_steps: 100000, log_every: 10, eval_every: 100000, checkpoint_every: 50, gen_samples: 0}
""")
    uri = f"sqlite:///{tmp_path}/results/mlflow.db"
    proc = start_sweep(tmp_path, "cc.yaml")
    try:
        def training():
            c, _, runs = sweep_runs(uri, "cc")
            return runs and c.get_metric_history(runs[0].info.run_id, "train/loss")

        wait_for(training, 240, every=1.0, what="the trial to log a loss")
        if how == "kill":
            proc.send_signal(signal.SIGTERM)
        else:
            os.killpg(proc.pid, signal.SIGINT if how == "ctrl-c" else signal.SIGTERM)
        out, _ = proc.communicate(timeout=240)
        assert proc.returncode == (130 if how == "ctrl-c" else 143), out[-3000:]
        wait_for(lambda: not group_alive(proc.pid), 30, what="the sweep's Ray processes (its process group) to exit")
    finally:
        kill_group(proc)
    assert "interrupted (rerun to resume)" in out and "Tuner.restore" not in out and "Traceback" not in out, out[-3000:]
    # a log written to a pipe: no terminal colours, no note about token authentication, no "ETA ?" lines
    assert "\x1b[" not in out and "Token authentication is enabled" not in out and "ETA ?" not in out, out[-3000:]
    _, _, runs = sweep_runs(uri, "cc")
    assert [r.info.status for r in runs] == ["KILLED"]


def test_sigterm_before_any_trial_stops_ray_and_the_sweep(tmp_path):
    """SIGTERM to the driver as the sweep sets up, before any trial (when its first line is printed, alongside Ray's
    start or just after it): Ray is stopped (started to the end first where the signal came while it started: see
    tests/test_compat.py), nothing of it is left in the sweep's process group, the command exits 143 with
    overtok's line, and the sweep's MLflow run ends KILLED with no trial run."""
    import threading

    write(tmp_path / "rs.yaml", """
name: rs
base:
  model: {d_model: 32, n_layers: 1, n_heads: 2, seq_len: 32}
  train: {max_steps: 5, eval_every: 5, log_every: 5, checkpoint_every: 1000, gen_samples: 0}
""")
    proc = start_sweep(tmp_path, "rs.yaml")
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        wait_for(lambda: any("[overtok] sweep rs: 1 trials" in line for line in lines), 120, every=0.05,
                 what="the sweep's first line")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 143
        reader.join(timeout=30)
        wait_for(lambda: not group_alive(proc.pid), 30, what="the sweep's Ray processes (its process group) to exit")
    finally:
        kill_group(proc)
    out = "".join(lines)
    assert out.rstrip().endswith("overtok: terminated") and "Traceback" not in out, out[-3000:]
    _, parents, runs = sweep_runs(f"sqlite:///{tmp_path}/results/mlflow.db", "rs")
    assert runs == [] and [p.info.status for p in parents] == ["KILLED"]


def test_a_corpus_that_fails_to_tokenize_ends_the_sweep_failed(tmp_path):
    """A corpus file found unreadable while the sweep prepares (alongside Ray's start): one line, exit 2, Ray
    stopped, and the sweep's MLflow run ends FAILED rather than staying RUNNING."""
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("some text to read\n\nand more of it\n")
    (tmp_path / "corpus" / "b.txt.xz").write_bytes(b"this is not xz")
    write(tmp_path / "bc.yaml", """
name: bc
base:
  model: {d_model: 32, n_layers: 1, n_heads: 2, seq_len: 16}
  data: {kind: text, corpus: corpus, tokenizer: "bpe:300", batch_size: 2}
  train: {max_steps: 5, eval_every: 5, log_every: 5, checkpoint_every: 1000, gen_samples: 0}
""")
    res = overtok(tmp_path, "sweep", "bc.yaml")
    assert res.returncode == 2, res.stdout[-3000:] + res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("overtok: error:")]
    assert len(errors) == 1 and "b.txt.xz: not a valid .xz file" in errors[0] and "Traceback" not in res.stderr
    _, parents, runs = sweep_runs(f"sqlite:///{tmp_path}/results/mlflow.db", "bc")
    assert runs == [] and [p.info.status for p in parents] == ["FAILED"]


def test_old_tune_state_of_a_sweep_is_removed_not_followed(tmp_path):
    from overtok.sweep import load_sweep
    from overtok.tune import remove_old_tune_runs

    write(tmp_path / "old.yaml", "name: old\nbase: {}\nray: {storage_path: st}\n")
    st = tmp_path / "st"
    for d in ("old-20260101-120000", "old-20260102-120000", "old", "older-20260101-120000"):
        (st / d).mkdir(parents=True)
    (tmp_path / "keep").mkdir()
    (st / "old-20260103-120000").symlink_to(tmp_path / "keep")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        remove_old_tune_runs(load_sweep("old.yaml"))
    finally:
        os.chdir(cwd)
    assert sorted(p.name for p in st.iterdir()) == ["old", "old-20260103-120000", "older-20260101-120000"]
    assert (tmp_path / "keep").is_dir()


def test_status_and_stop_of_one_trial_while_the_sweep_runs(tmp_path):
    """overtok status lists running and pending trials with their last loss; overtok stop makes one running trial
    checkpoint and end KILLED while the sweep goes on; a rerun resumes it from that checkpoint and finishes it."""
    write(tmp_path / "st.yaml", """
name: st
base:
  model: {d_model: 32, n_layers: 2, n_heads: 2, seq_len: 32}
  train: {log_every: 10, eval_every: 100000, checkpoint_every: 100000, gen_samples: 0}
zip:
  - {train.max_steps: [12000, 100], model.od_depth: [1, 2]}
max_concurrent: 1
""")
    uri = f"sqlite:///{tmp_path}/results/mlflow.db"
    proc = start_sweep(tmp_path, "st.yaml")
    try:
        def logging_loss():
            c, _, runs = sweep_runs(uri, "st")
            return [r for r in runs if c.get_metric_history(r.info.run_id, "train/loss")]

        wait_for(logging_loss, 240, every=1.0, what="a trial logging its loss")
        victim = next(r for r in logging_loss() if r.data.params["train.max_steps"] == "12000").data.tags["overtok.trial_id"]
        status = overtok(tmp_path, "status", "st.yaml", timeout=120)
        assert status.returncode == 0, status.stderr
        assert f"{victim}" in status.stdout and "RUNNING" in status.stdout and "PENDING" in status.stdout
        stop = overtok(tmp_path, "stop", "st.yaml", "--trial", victim[:6], timeout=240)
        assert stop.returncode == 0 and "stopped: KILLED" in stop.stdout, stop.stdout + stop.stderr
        out, _ = proc.communicate(timeout=400)
    except BaseException:
        kill_group(proc)
        print("the sweep's output:\n" + sweep_output_after_kill(proc))  # shown with the failure
        raise
    finally:
        kill_group(proc)
    assert proc.returncode == 0, out[-3000:]
    assert "1 stopped on request" in out and "1/2 finished" in out, out[-3000:]
    rerun = overtok(tmp_path, "sweep", "st.yaml", timeout=400)
    assert rerun.returncode == 0 and "resumed from" in rerun.stdout + rerun.stderr, rerun.stdout[-3000:]
    c, _, runs = sweep_runs(uri, "st")
    assert sorted(r.info.status for r in runs) == ["FINISHED"] * 2
    again = overtok(tmp_path, "status", "st", timeout=120)
    assert "2 finished" in again.stdout, again.stdout


def test_time_limit_starts_no_trial_it_cannot_finish_and_stops_one_at_the_limit(tmp_path):
    """--time-limit: two short trials run; the third, 20,000 times their size, would need far more than is left, so
    it is not started (no run: the sweep is resumable) and the sweep exits 0. Rerun with a limit of 25 s, it starts
    (nothing measured in that run), is stopped at the limit and its run is KILLED: exit 124."""
    write(tmp_path / "tl.yaml", """
name: tl
base:
  model: {d_model: 32, n_layers: 1, n_heads: 2, seq_len: 32}
  data: {batch_size: 4}
  train: {max_steps: 5, eval_every: 5, log_every: 5, checkpoint_every: 1000, gen_samples: 0}
zip:
  - {train.max_steps: [5, 5, 100000], train.lr: [1e-3, 2e-3, 1e-3]}
max_concurrent: 1
""")
    uri = f"sqlite:///{tmp_path}/results/mlflow.db"
    res = overtok(tmp_path, "sweep", "tl.yaml", "--time-limit", "300")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert re.search(r"--time-limit: trial max_steps=100000 .* would need about \d+ s", res.stdout), res.stdout[-3000:]
    assert "2/3 finished, 0 failed, 1 not started (--time-limit) (rerun to resume)" in res.stdout, res.stdout[-3000:]
    _, parents, runs = sweep_runs(uri, "tl")
    assert sorted(r.data.params["train.max_steps"] for r in runs) == ["5", "5"]
    assert all(r.info.status == "FINISHED" for r in runs) and parents[0].info.status == "KILLED"

    t0 = time.time()
    res = overtok(tmp_path, "sweep", "tl.yaml", "--time-limit", "25")
    took = time.time() - t0
    assert res.returncode == 124, res.stdout[-3000:] + res.stderr[-3000:]
    assert "--time-limit: 25 s reached" in res.stdout and "Traceback" not in res.stdout + res.stderr
    assert took < 25 + 30, took  # the stop and Ray's shutdown, not a trial of 100,000 steps
    _, _, runs = sweep_runs(uri, "tl")
    long = [r for r in runs if r.data.params["train.max_steps"] == "100000"]
    assert [r.info.status for r in long] in ([], ["KILLED"])  # [] where the limit passed before it started


def test_time_limit_holds_back_a_first_trial_its_estimate_says_cannot_end(tmp_path):
    """Nothing measured yet: a trial whose estimate (2M steps; minutes even on the calibration's GPU) cannot end
    within the limit is not started, and says why; exit 0, no trial run, the sweep resumable."""
    write(tmp_path / "big.yaml", """
name: big
base:
  model: {d_model: 256, n_layers: 4, n_heads: 4, seq_len: 256}
  data: {batch_size: 8}
  train: {max_steps: 2000000, eval_every: 1000000, log_every: 1000, checkpoint_every: 10000000, gen_samples: 0}
""")
    res = overtok(tmp_path, "sweep", "big.yaml", "--time-limit", "60")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert re.search(r"--time-limit: trial big \[\w+\] would need at least about \d+ s \(0.8 of the plan's estimate; "
                     r"no trial here has ended to measure\)", res.stdout), res.stdout[-3000:]
    assert "0/1 finished, 0 failed, 1 not started (--time-limit) (rerun to resume)" in res.stdout
    _, parents, runs = sweep_runs(f"sqlite:///{tmp_path}/results/mlflow.db", "big")
    assert runs == [] and parents[0].info.status == "KILLED"


def test_a_curve_cut_short_by_the_time_limit_still_gives_its_accuracy_curve(tmp_path):
    """A generation-accuracy measurement stopped by --time-limit before it finishes: its run is KILLED, and
    `overtok report` still draws and lists the accuracy curve from the evaluations it logged, saying that the
    trial did not finish (no other fit: nothing finished)."""
    write(tmp_path / "tc.yaml", """
name: tc
base:
  model: {d_model: 32, n_layers: 1, n_heads: 2, seq_len: 64}
  data: {kind: cfg, grammar: cfg3f, batch_size: 4}
  train: {max_steps: 100000, eval_every: 20, eval_batches: 2, log_every: 10, checkpoint_every: 100000,
          gen_samples: 4, gen_every: 20}
""")
    res = overtok(tmp_path, "sweep", "tc.yaml", "--time-limit", "30")
    assert res.returncode == 124, res.stdout[-3000:] + res.stderr[-3000:]
    res = overtok(tmp_path, "report", "tc.yaml")
    assert res.returncode == 0, res.stderr[-3000:]
    fitted = json.loads((tmp_path / "results" / "tc" / "fits.json").read_text())
    assert fitted["trials_finished"] == 0 and set(fitted) >= {"cfg_accuracy_curve", "notes"}
    (curve,) = fitted["cfg_accuracy_curve"]["d32-L1"].values()
    runs = pd.read_parquet(tmp_path / "results" / "tc" / "runs.parquet")
    assert list(runs.status) == ["KILLED"] and curve["unfinished"] == list(runs.trial_id)
    assert len(curve["points"]) >= 2 and all(p["samples"] == 4 for p in curve["points"])
    assert (tmp_path / "results" / "tc" / "figures" / "fig2_cfg_accuracy_curve.png").is_file()
    page = (tmp_path / "dashboards" / "tc" / "index.html").read_text()
    assert "1 trial(s) did not finish" in page and 'alt="fig2_cfg_accuracy_curve"' in page
