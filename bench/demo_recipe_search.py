"""How the demo recipe was chosen: candidate recipes trained on the demo split, compared on val only.

    python bench/demo_recipe_search.py [--only NAME ...] [--jobs 2] [--out exp/recipe_search]

Each candidate in ``bench/demo_recipes.yaml`` is an overrides mapping (``experiments.pipeline --overrides``)
laid over ``experiments/configs/demo/pipeline.yaml``. The script adds ``data: {test: null}`` and
``baselines: false`` to every one, so a search run never loads the test lists: only the validation trials
choose. It runs s1 -> merge -> s2 -> s3 (``--until s3``), then scores the selected s3 model on the val trials
with the speaker-level bootstrap 95 % interval (``svlib.scoring.bootstrap``), and records per recipe:

* ``val_eer_pct``, ``val_eer_ci``, ``val_mindcf_0.01``: the s3 model the pipeline would evaluate;
* ``stage_val_eer_pct``: each training stage's best val EER, and ``minutes`` per stage and in total;
* ``threads`` and the machine's load average before and after;
* ``test_looks`` (the whole search, from ``demo_recipes.yaml``): each time a chosen recipe was scored on the
  test lists by the pipeline (never by a search run), with what it scored and what was done next: a look at
  test can steer a search, and the record must say so;
* ``control``: what the encoder is worth (``--control``, on for every recipe from round 7 on). s2's encoder is
  removed (``experiments.prune.control_encoder``: every head, FFN unit and conv channel cut), then it goes
  through the demo pruning's own graft -> ps1 -> ps2 -> ps3 (``experiments/configs/demo_prune``), exactly as a
  pruned point would; its val EER sits beside the teacher's (s2, the pruning teacher), with the paired
  speaker-level bootstrap interval of EER(control) - EER(teacher) on the val trials. A recipe whose interval
  is not above 0 cannot measure pruning: its EER does not need the encoder blocks.

``--probe NAME LR_FRONTEND LR_BACKEND`` instead runs a 150-step trainability probe (no search run): the 4 x 64
encoder of the round-2 recipes, batch 32 of 2 s crops from the demo train list, speaker-balanced, no margin
and no augmentation, AdamW with a 20-step warm-up and clipping at 5, and records the mean training loss of
every 25 steps under ``probes`` (chance level is ln(classes)). It ranks learning rates in a few minutes where a
recipe takes twenty; it uses no val or test data at all.

With ``--jobs 2`` two recipes train side by side, one torch thread each: on 2 cores that costs each about
twice its 2-thread time, and keeps a pair's minutes comparable with each other (the record says so with
``threads``). Finished recipes are kept in ``bench/results/demo_recipe_search.json`` and skipped on a rerun
(their stage folders are reused too), so a killed search resumes.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from experiments.common import print_table, read_result  # noqa: E402
from svlib.config import merge_overrides, read_yaml  # noqa: E402
from svlib.files import write_json, write_text_atomic  # noqa: E402

import yaml  # noqa: E402

PIPELINE = "experiments/configs/demo/pipeline.yaml"
RECIPES = REPO / "bench" / "demo_recipes.yaml"
RESULT = REPO / "bench" / "results" / "demo_recipe_search.json"
TRAIN_STAGES = ("s1", "s2", "s3")
# What every search run gets on top of its recipe: no test list is ever read, no baselines run.
SEARCH_ONLY = {"data": {"test": None}, "baselines": False}


def read_results() -> dict:
    """The results file as it is now (another job or a probe may have written it since we last read it)."""
    return json.loads(RESULT.read_text()) if RESULT.exists() else {"recipes": {}}


def val_summary(result: dict) -> dict:
    """The val-list keys a record keeps from an evaluation result (EER and minDCF with their intervals)."""
    return {"val_eer_pct": result["eer_pct"], "val_eer_ci": result.get("eer_ci_pct"),
            "val_mindcf_0.01": result["mindcf_0.01"], "val_mindcf_0.01_ci": result.get("mindcf_0.01_ci")}


def val_with_interval(stage_dir: Path, threads: int) -> dict:
    """The stage's model on the val trials, with the speaker-level bootstrap interval (in this process)."""
    import torch

    from experiments.common import DataConfig
    from svlib.evaluate import EvalConfig, evaluate
    from svlib.model.speaker import load_model

    torch.set_num_threads(threads)
    data = DataConfig(**read_yaml(REPO / PIPELINE)["data"])
    val_dir, trials = data.validation()
    model = load_model(stage_dir / "model").eval()
    return val_summary(evaluate(model, val_dir, {"val": trials}, EvalConfig(progress=False, ci_replicates=1000))["val"])


def search_overrides(recipe: dict, out_dir: str) -> dict:
    """The overrides a search run trains with: the recipe's, its own out_dir, and SEARCH_ONLY (no test list)."""
    return merge_overrides(recipe.get("overrides") or {}, {"out_dir": out_dir, **SEARCH_ONLY})


DEMO_PRUNE = REPO / "experiments" / "configs" / "demo_prune"


def control_pipeline(run_dir: Path) -> Path:
    """A pipeline YAML (in ``run_dir``) that removes s2's encoder and fine-tunes it as a pruned point."""
    data = merge_overrides(read_yaml(REPO / PIPELINE)["data"], SEARCH_ONLY["data"])
    rel = Path(os.path.relpath(DEMO_PRUNE, run_dir)).as_posix()
    stages = [{"name": "s2", "kind": "use", "path": (run_dir / "s2").relative_to(REPO).as_posix()},
              {"name": "removed", "kind": "control", "control": "encoder_removed", "init": "s2"},
              {"name": "graft", "kind": "graft", "init": "removed", "teacher": "s2"}]
    previous = "graft"
    for ps in ("ps1", "ps2", "ps3"):
        stages.append({"name": ps, "kind": "train", "config": f"{rel}/{ps}.yaml", "init": previous})
        previous = ps
    config = {"name": "control", "out_dir": (run_dir / "control").relative_to(REPO).as_posix(), "data": data,
              "stages": stages, "baselines": False}
    path = run_dir / "control.yaml"
    write_text_atomic(path, yaml.safe_dump(config, sort_keys=False))
    return path


def control_check(run_dir: Path, threads: int, env: dict) -> dict:
    """The encoder-removed control of the recipe's s2, on val beside s2 (module docstring)."""
    import torch

    from experiments.common import DataConfig
    from svlib.evaluate import EvalConfig, evaluate
    from svlib.model.speaker import load_model
    from svlib.scoring.bootstrap import paired_bootstrap, trial_speakers

    if read_result(run_dir / "control" / "ps3") is None:
        with open(run_dir / "log.txt", "a", encoding="utf-8") as log:
            code = subprocess.call([sys.executable, "-m", "experiments.pipeline", "--config",
                                    str(control_pipeline(run_dir)), "--no-tracking"],
                                   cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        if code != 0:
            raise RuntimeError(f"control of {run_dir.name}: pipeline exited with {code}; see {run_dir / 'log.txt'}")
    torch.set_num_threads(threads)
    data = DataConfig(**read_yaml(REPO / PIPELINE)["data"])
    val_dir, trials = data.validation()
    cfg = EvalConfig(progress=False, ci_replicates=1000)
    teacher = evaluate(load_model(run_dir / "s2" / "model").eval(), val_dir, {"val": trials}, cfg)["val"]
    control = evaluate(load_model(run_dir / "control" / "ps3" / "model").eval(), val_dir, {"val": trials}, cfg)["val"]
    speakers = trial_speakers(trials.enroll, trials.test, trials.labels, val_dir.utt2spk)
    paired = paired_bootstrap(control["scores"], teacher["scores"], trials.labels, speakers, 1000)["eer_pct"]
    removed = read_result(run_dir / "control" / "removed")
    return {"teacher_val_eer_pct": teacher["eer_pct"], "teacher_val_eer_ci": teacher["eer_ci_pct"],
            "control_val_eer_pct": control["eer_pct"], "control_val_eer_ci": control["eer_ci_pct"],
            "control_minus_teacher_val_ci": paired["ci"], "control_minus_teacher_val": paired["diff"],
            "control_sparsity": removed["achieved_sparsity"],
            "encoder_matters": bool(paired["ci"][0] > 0.0)}


def run_recipe(name: str, recipe: dict, out: Path, threads: int, jobs: int, control: bool = False) -> dict:
    run_dir = out / name
    run_dir.mkdir(parents=True, exist_ok=True)
    overrides = search_overrides(recipe, run_dir.relative_to(REPO).as_posix())
    overrides_path = run_dir / "overrides.yaml"
    write_text_atomic(overrides_path, yaml.safe_dump(overrides, sort_keys=False))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    # How the stages were trained, kept beside them: a rerun that finds them finished reports that, not itself.
    run_info = run_dir / "run.json"
    if read_result(run_dir / TRAIN_STAGES[-1]) is None:
        info = {"threads": threads, "parallel_jobs": jobs, "load_average_before": list(os.getloadavg())}
        with open(run_dir / "log.txt", "a", encoding="utf-8") as log:
            code = subprocess.call([sys.executable, "-m", "experiments.pipeline", "--config", PIPELINE,
                                    "--overrides", str(overrides_path), "--until", "s3", "--no-tracking"],
                                   cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        if code != 0:
            raise RuntimeError(f"recipe {name}: pipeline exited with {code}; see {run_dir / 'log.txt'}")
        write_json(run_info, info | {"load_average_after": list(os.getloadavg())})
    info = json.loads(run_info.read_text())
    stages = {s: read_result(run_dir / s) for s in (*TRAIN_STAGES, "merge")}
    record = {
        "why": recipe.get("why", ""),
        "overrides": recipe.get("overrides") or {},
        **val_with_interval(run_dir / "s3", threads),
        "stage_val_eer_pct": {s: stages[s].get("best_val_eer_pct") for s in TRAIN_STAGES},
        "stage_steps": {s: stages[s].get("steps") for s in TRAIN_STAGES},
        "minutes": {s: r.get("minutes") for s, r in stages.items()},
        "minutes_total": sum(r.get("minutes") or 0.0 for r in stages.values()),
        **info,
    }
    if control:
        record["control"] = control_check(run_dir, threads, env)
    return record


def val_fbank_baseline() -> dict:
    """The mean/std log-mel cosine baseline on the val trials, the bar a recipe must clear there."""
    from experiments.baselines import fbank_baseline
    from experiments.common import DataConfig
    from svlib.evaluate import EvalConfig

    data = read_yaml(REPO / PIPELINE)["data"]
    val = DataConfig(test=data["val"], test_trials={"val": data["val_trials"]})
    return val_summary(fbank_baseline(val, EvalConfig(progress=False, ci_replicates=1000))["val"])


PROBE_ENCODER = {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 256,
                 "output_hidden_size": 64}


def probe(lr_frontend: float, lr_backend: float, embed_norm: bool = False, steps: int = 150, every: int = 25,
          seed: int = 0) -> dict:
    """Mean training loss per ``every`` steps of a short run (module docstring), with its wall time."""
    import math
    import time

    import torch

    from experiments.common import DataConfig
    from svlib.config import from_dict
    from svlib.data.sampling import SamplingConfig, TrainLoader
    from svlib.losses import AAMSoftmax
    from svlib.model.speaker import SpeakerModelConfig, build_speaker_model

    torch.manual_seed(seed)
    model = build_speaker_model(from_dict(SpeakerModelConfig, {
        "frontend": {"preset": "small", "encoder": PROBE_ENCODER},
        "backend": {"type": "mfa", "adapter_dim": 64, "embed_dim": 128, "embed_norm": embed_norm}}))
    train_dir = DataConfig(**read_yaml(REPO / PIPELINE)["data"]).load_dir("train")
    loader = TrainLoader(train_dir, SamplingConfig(batch_size=32, crop_seconds=(2.0, 2.0), speed_perturb=False,
                                                   num_workers=1, cache_bytes=400_000_000), seed=seed)
    head = AAMSoftmax(128, loader.num_classes, scale=32.0, margin=0.0)
    groups = [{"params": list(model.frontend.parameters()), "lr": lr_frontend},
              {"params": list(model.backend.parameters()) + list(head.parameters()), "lr": lr_backend}]
    opt = torch.optim.AdamW(groups, weight_decay=1e-4)
    params = [p for g in groups for p in g["params"]]
    losses, start = [], time.perf_counter()
    for step, batch in zip(range(steps), loader):
        for group, peak in zip(opt.param_groups, (lr_frontend, lr_backend)):
            group["lr"] = peak * min(1.0, (step + 1) / 20)
        loss = head(model(batch.waves, batch.lengths), batch.labels)[0]
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        opt.step()
        losses.append(loss.item())
    means = [sum(losses[i:i + every]) / every for i in range(0, steps, every)]
    return {"lr_frontend": lr_frontend, "lr_backend": lr_backend, "embed_norm": embed_norm, "steps": steps, "mean_loss_per_25_steps": means,
            "chance_loss": math.log(loader.num_classes), "minutes": (time.perf_counter() - start) / 60,
            "threads": torch.get_num_threads(), "load_average": list(os.getloadavg())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", help="run these recipes (default: every recipe not yet recorded)")
    parser.add_argument("--jobs", type=int, default=1, help="recipes trained side by side (1 torch thread each)")
    parser.add_argument("--out", default="exp/recipe_search")
    parser.add_argument("--rerun", action="store_true", help="rerun recipes already in the results file")
    parser.add_argument("--probe", nargs=3, metavar=("NAME", "LR_FRONTEND", "LR_BACKEND"),
                        help="run one trainability probe instead (see above)")
    parser.add_argument("--embed-norm", action="store_true", help="probe: BatchNorm on the embedding")
    parser.add_argument("--control", action="store_true",
                        help="also run the encoder-removed control of each recipe (module docstring)")
    args = parser.parse_args(argv)

    recipes = read_yaml(RECIPES)["recipes"]
    if args.probe:
        name, lr_frontend, lr_backend = args.probe
        record = probe(float(lr_frontend), float(lr_backend), args.embed_norm)
        latest = read_results()  # after the probe's minutes: a search may have added records meanwhile
        latest.setdefault("probes", {})[name] = record
        finish(latest)
        print(f"[probe] {name}: mean loss per 25 steps {[round(v, 3) for v in record['mean_loss_per_25_steps']]}")
        return 0
    results = read_results()
    names = args.only or list(recipes)
    unknown = [n for n in names if n not in recipes]
    if unknown:
        parser.error(f"unknown recipe(s) {unknown}; {RECIPES.relative_to(REPO)} has {list(recipes)}")
    todo = [n for n in names if args.rerun or n not in results["recipes"]]
    if "val_fbank_baseline" not in results:
        results["val_fbank_baseline"] = val_fbank_baseline()
        finish(results)
    threads = 1 if args.jobs > 1 else int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1))
    out = REPO / args.out

    lock = threading.Lock()

    def one(name: str) -> None:
        record = run_recipe(name, recipes[name], out, threads, args.jobs, args.control)
        with lock:  # read-modify-write of the file: another job (or a probe) may have added records meanwhile
            latest = read_results()
            latest["recipes"][name] = record
            finish(latest)
        control = record.get("control")
        print(f"[search] {name}: val EER {record['val_eer_pct']:.2f} % {record['val_eer_ci']}, "
              f"{record['minutes_total']:.1f} min"
              + (f"; encoder removed: {control['control_val_eer_pct']:.2f} % vs teacher "
                 f"{control['teacher_val_eer_pct']:.2f} %, paired {control['control_minus_teacher_val_ci']}"
                 if control else ""), flush=True)

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for future in [pool.submit(one, n) for n in todo]:
            future.result()
    return 0


def finish(results: dict) -> None:
    """Pick the recipe with the lowest val EER (test is never read here) and write the JSON and table."""
    base = results.get("val_fbank_baseline")
    rows = [{"recipe": "(baseline: mean/std log-mel cosine)", "val_eer_pct": base["val_eer_pct"],
             "val_eer_ci": "[{:.2f}, {:.2f}]".format(*base["val_eer_ci"]), "val_mindcf_0.01": base["val_mindcf_0.01"],
             "minutes": "", "threads": ""}] if base else []
    rows += [{"recipe": n, "val_eer_pct": r["val_eer_pct"],
             "val_eer_ci": "[{:.2f}, {:.2f}]".format(*r["val_eer_ci"]) if r.get("val_eer_ci") else "",
             "val_mindcf_0.01": r["val_mindcf_0.01"], "minutes": r["minutes_total"], "threads": r["threads"],
             **({"removed_val": r["control"]["control_val_eer_pct"], "teacher_val": r["control"]["teacher_val_eer_pct"],
                 "removed-teacher": "[{:+.2f}, {:+.2f}]".format(*r["control"]["control_minus_teacher_val_ci"])}
                if r.get("control") else {})}
            for n, r in results["recipes"].items()]
    if results["recipes"]:
        results["chosen_by_val"] = min(results["recipes"], key=lambda n: results["recipes"][n]["val_eer_pct"])
    results["selection"] = "lowest val EER of the s3 model; the test lists are never loaded by a search run"
    # candidates started and stopped before a result (demo_recipes.yaml ``stopped``), with the reason
    results["stopped"] = {n: r.get("why", "") for n, r in (read_yaml(RECIPES).get("stopped") or {}).items()}
    # every time a chosen recipe was scored on the test lists (by the pipeline, never by a search run) and what
    # was done next (demo_recipes.yaml ``test_looks``): a look at test can steer a search, so the record lists it
    results["test_looks"] = read_yaml(RECIPES).get("test_looks") or []
    results["table"] = print_table(rows, ["recipe", "val_eer_pct", "val_eer_ci", "val_mindcf_0.01", "minutes",
                                          "threads", "teacher_val", "removed_val", "removed-teacher"],
                                   title="demo recipe search (val trials only; removed = the encoder-removed "
                                         "control of s2, teacher = s2)")
    write_json(RESULT, results)


if __name__ == "__main__":
    sys.exit(main())
