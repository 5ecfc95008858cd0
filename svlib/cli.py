"""The ``svlib`` console script (also ``python -m svlib.cli``).

Each subcommand is two small functions, ``_<name>_args(parser)`` and ``_<name>(args) -> int``, listed once
in ``COMMANDS`` at the bottom. Expected failures (a missing file, a malformed list, an unknown utterance, a
device that does not exist, the model running out of memory on a long file) are exceptions derived from
``ValueError``/``KeyError``/``OSError``/``RuntimeError``/``MemoryError`` that name the file and the problem;
``main`` prints that one line to stderr and exits with 2. ``--traceback`` (or ``SVLIB_TRACEBACK=1``) shows
the full trace when debugging svlib itself.

Cheap checks come first: devices, output paths, calibration files, thresholds and audio headers are all
validated before a model is loaded or a single utterance is embedded.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Callable, NamedTuple

EXIT_USAGE = 2
DEFAULT_MIN_DBFS = -60.0  # svlib.evaluate.EvalConfig.min_rms_dbfs for the CLI: digital silence is about -inf
CHECKPOINT_EVERY = 256    # utterances between two partial-embedding checkpoints of `svlib embed`


class Command(NamedTuple):
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _note(message: str) -> None:
    print(f"svlib: note: {message}", file=sys.stderr)


def _warn(message: str) -> None:
    print(f"svlib: warning: {message}", file=sys.stderr)


def _narrowband_note(names: list[str], total: int, where: str) -> None:
    """One note naming the narrow-band inputs (the first five) of ``total``, if there are any."""
    from svlib.audio import NARROWBAND_NOTE

    if names:
        more = f" and {len(names) - 5} more" if len(names) > 5 else ""
        _note(f"{len(names)} of {total} input(s) are {NARROWBAND_NOTE}: {', '.join(names[:5])}{more}{where}")


# ---------------------------------------------------------------------------------------- checks


def _check_device(spec: str) -> str:
    """``spec`` if torch can run on it here; else a one-line ValueError (before any model is loaded)."""
    import torch

    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"--device {spec!r}: not a torch device (use cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is a CPU-only build" if torch.version.cuda is None else "no CUDA device is visible"
            raise ValueError(f"--device {spec!r}: CUDA is not available ({why}, torch {torch.__version__}); "
                             "use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"--device {spec!r}: only {count} CUDA device(s) visible (cuda:0..cuda:{count - 1})")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"--device {spec!r}: MPS is not available on this machine; use --device cpu")
    elif device.type != "cpu":
        raise ValueError(f"--device {spec!r}: unsupported device type {device.type!r} (use cpu, cuda or mps)")
    return spec


def _check_output(path: Path, suffix: str, flag: str) -> Path:
    """An output path that can be written, checked before any work that it would hold."""
    if path.suffix.lower() != suffix:
        raise ValueError(f"{flag} {path}: expected a {suffix} file name")
    if path.is_dir():
        raise IsADirectoryError(f"{flag} {path}: is a directory")
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(f"{flag} {path}: cannot create its folder ({err.strerror or err})") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"{flag} {path}: folder {parent} is not writable")
    return path


def _finite(value: float | None, flag: str) -> float | None:
    if value is not None and not math.isfinite(value):
        raise ValueError(f"{flag} must be a finite number, got {value}")
    return value


# ---------------------------------------------------------------------------------------- score


def _norm_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--asnorm", type=Path, metavar="COHORT.npz", help="AS-norm with this cohort embeddings file")
    p.add_argument("--top-n", type=int, default=300, help="AS-norm cohort size per side (default 300)")
    p.add_argument("--enroll", type=Path, metavar="ENROLL_LIST",
                   help="enrolment list '<enroll-id> <utt> [<utt> ...]' (CN-Celeb): the trials' enrolment side "
                        "is then the mean of the length-normalised embeddings of each id's utterances")


def _score_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trials", required=True, type=Path, help="trial list: '1 enroll test' or 'enroll test target'")
    p.add_argument("--embeddings", required=True, type=Path, help="embeddings .npz (arrays utts, embeddings)")
    p.add_argument("--scores-out", type=Path, help="write 'enroll test score' lines here (atomically)")
    _norm_args(p)
    p.add_argument("--calibration", type=Path, metavar="CALIB.json",
                   help="apply this calibration; scores become LLRs and Cllr is reported. It must have been fitted "
                        "with the same --asnorm/--top-n setting")
    p.add_argument("--det", type=Path, metavar="DET.png", help="also write a DET plot")
    p.add_argument("--ci", action="store_true",
                   help="also print speaker-level bootstrap 95%% confidence intervals of EER and minDCF")
    _bootstrap_args(p, "--ci-")


def _bootstrap_args(p: argparse.ArgumentParser, prefix: str) -> None:
    p.add_argument(f"{prefix}replicates", type=int, default=1000, dest="replicates",
                   help="bootstrap replicates (default 1000)")
    p.add_argument(f"{prefix}seed", type=int, default=0, dest="seed", help="bootstrap random seed (default 0)")
    p.add_argument("--utt2spk", type=Path, metavar="UTT2SPK",
                   help="'<utt> <speaker>' lines giving the speakers the bootstrap resamples; default: the id's "
                        "prefix before the first '/' or '-' (VoxCeleb, svlib prepare)")


def _trial_speakers(args: argparse.Namespace, trials):
    """Speakers of the trials (``--utt2spk`` or the id prefix), checked against the labels."""
    from svlib.scoring.bootstrap import trial_speakers

    if args.replicates < 1:
        flag = "--ci-replicates" if args.command == "score" else "--replicates"
        raise ValueError(f"{flag} must be a positive number, got {args.replicates}")
    utt2spk = None
    if args.utt2spk is not None:
        from svlib.data.lists import read_utt2spk

        utt2spk = read_utt2spk(args.utt2spk)
    return trial_speakers(trials.enroll, trials.test, trials.labels, utt2spk,
                          source=str(args.utt2spk or args.trials))


def _p_value(p: float, replicates: int) -> str:
    # two-sided: 2 min(share <= 0, share >= 0) moves in steps of 2/R, so no crossing replicate means p < 2/R
    return f"< {2.0 / replicates:.2g}" if p == 0.0 else f"= {p:.3f}"


def _interval(ci: list[float], digits: int) -> str:
    return f"[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def _norm_setting(top_n: int | None, cohort: str | None = None) -> str:
    if top_n is None:
        return "raw cosine"
    return f"AS-norm top-{top_n}" + (f" (cohort {cohort})" if cohort else "")


def _requested_norm(args: argparse.Namespace) -> dict | None:
    return None if args.asnorm is None else {"top_n": args.top_n, "cohort": Path(args.asnorm).name}


def _check_calibration_norm(cal, path: Path, args: argparse.Namespace) -> None:
    """Refuse a calibration fitted on differently normalised scores: its LLRs would be meaningless
    (raw-cosine calibration on AS-norm scores: Cllr 0.41 -> 2.40 bits, and nothing said so)."""
    meta = cal.meta
    if "asnorm" in meta:
        fitted = meta["asnorm"]
    elif "asnorm_top_n" in meta:  # written by svlib < 0.2 calibrate
        fitted = None if meta["asnorm_top_n"] is None else {"top_n": meta["asnorm_top_n"]}
    elif "thresholds" in meta:  # svlib calibrate-model: raw cosine by construction
        fitted = None
    else:
        requested = _norm_setting(args.top_n if args.asnorm else None)
        _note(f"{path}: records no score normalisation; cannot check that it matches {requested}")
        return
    requested = _requested_norm(args)
    fitted_n = None if fitted is None else fitted.get("top_n")
    requested_n = None if requested is None else requested["top_n"]
    if fitted_n != requested_n:
        raise ValueError(
            f"{path}: calibration was fitted on {_norm_setting(fitted_n, (fitted or {}).get('cohort'))} scores, "
            f"but this run computes {_norm_setting(requested_n, (requested or {}).get('cohort'))} scores; refit it "
            "with `svlib calibrate` and the same --asnorm/--top-n, or drop --calibration")


def _load_scores(args: argparse.Namespace):
    """Trials, table and (normalised) scores: the shared first half of ``score`` and ``calibrate``.

    With ``--enroll`` the returned table holds the enrolment models under their ids plus the test utterances.
    """
    from svlib.data.lists import read_trials
    from svlib.scoring.metrics import cosine_scores, load_embeddings
    from svlib.scoring.norm import as_norm

    trials = read_trials(args.trials)
    table = load_embeddings(args.embeddings)
    cohort = load_embeddings(args.asnorm) if args.asnorm is not None else None
    if args.enroll is not None:
        from svlib.scoring.enroll import read_enroll_list, with_enroll_models

        table = with_enroll_models(table, read_enroll_list(args.enroll), trials, source=str(args.enroll))
    scores = cosine_scores(table, trials, source=str(args.trials))
    if cohort is not None:
        scores = as_norm(table, trials, cohort, top_n=args.top_n, scores=scores)
    return trials, table, scores


def _print_table(rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value:>10}")


def _score(args: argparse.Namespace) -> int:
    import numpy as np

    from svlib.scoring.metrics import plot_det, summarize

    cal = None
    if args.calibration is not None:  # before any scoring: a mismatched calibration is refused at once
        from svlib.scoring.calibration import load_calibration

        cal = load_calibration(args.calibration)
        _check_calibration_norm(cal, args.calibration, args)
    trials, table, scores = _load_scores(args)
    used = sorted(trials.utterances)
    _narrowband_note(table.flagged("narrowband", used), len(used), f" (flagged in {args.embeddings})")
    calibrated = None if cal is None else cal.apply(scores, table, trials)
    final = scores if calibrated is None else calibrated
    summary = summarize(final, trials.labels)
    rows = [
        ("trials", f"{summary['num_trials']}"),
        ("target trials", f"{summary['num_target']}"),
        ("EER (%)", f"{summary['eer_pct']:.3f}"),
        ("minDCF (p=0.01)", f"{summary['mindcf_0.01']:.4f}"),
        ("minDCF (p=0.05)", f"{summary['mindcf_0.05']:.4f}"),
    ]
    if args.ci:
        from svlib.scoring.bootstrap import bootstrap_ci

        speakers = _trial_speakers(args, trials)
        ci = bootstrap_ci(final, trials.labels, speakers, args.replicates, args.seed)
        rows[3:3] = [("EER 95% CI (%)", _interval(ci["eer_pct"], 3))]
        rows[5:5] = [("minDCF (p=0.01) 95% CI", _interval(ci["mindcf_0.01"], 4))]
        rows += [("minDCF (p=0.05) 95% CI", _interval(ci["mindcf_0.05"], 4)),
                 ("bootstrap", f"{ci['replicates']} x {ci['speakers']} speakers, seed {ci['seed']}")]
    if calibrated is not None:
        from svlib.scoring.calibration import cllr, min_cllr

        rows += [("Cllr (bits)", f"{cllr(calibrated, trials.labels):.4f}"),
                 ("minCllr (bits)", f"{min_cllr(calibrated, trials.labels):.4f}")]
    norm = f"AS-norm top-{args.top_n}" if args.asnorm else "cosine"
    enrolled = f" | enrolment models {args.enroll}" if args.enroll is not None else ""
    print(f"# {args.trials}{enrolled} | {norm}{' + calibration' if calibrated is not None else ''}")
    _print_table(rows)
    if args.ci and ci.get("note"):
        print(f"# note: {ci['note']}")
    if args.scores_out is not None:
        from svlib.files import write_lines_atomic

        # through a temporary file + rename: an interrupted run never leaves a truncated score file behind
        write_lines_atomic(args.scores_out, (f"{e} {t} {s:.6f}" for e, t, s in
                                             zip(trials.enroll, trials.test, np.asarray(final))))
    if args.det is not None:
        plot_det({norm: (final, trials.labels)}, args.det)
    return 0


# ------------------------------------------------------------------------------------ compare


def _compare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("scores", nargs=2, type=Path, metavar="SCORES",
                   help="score files of systems A and B ('enroll test score [label]', e.g. from score --scores-out)")
    p.add_argument("--trials", required=True, type=Path, help="the labelled trial list both files score")
    _bootstrap_args(p, "--")
    p.add_argument("--json", type=Path, metavar="OUT.json", help="also write the comparison as JSON")


def _compare(args: argparse.Namespace) -> int:
    from svlib.data.lists import read_trials
    from svlib.files import write_json
    from svlib.scoring.bootstrap import load_trial_scores, paired_bootstrap

    if args.json is not None:
        _check_output(args.json, ".json", "--json")
    trials = read_trials(args.trials)
    speakers = _trial_speakers(args, trials)
    path_a, path_b = args.scores
    scores_a = load_trial_scores(path_a, trials, str(args.trials))
    scores_b = load_trial_scores(path_b, trials, str(args.trials))
    result = paired_bootstrap(scores_a, scores_b, trials.labels, speakers, args.replicates, args.seed)
    print(f"# A = {path_a} | B = {path_b} | {args.trials}: {len(trials)} trials, {speakers.num_speakers} speakers, "
          f"paired speaker bootstrap x {args.replicates}, seed {args.seed}")
    print(f"{'metric':<16}  {'A':>9}  {'B':>9}  {'A - B':>9}  {'95% CI of A - B':>22}")
    for key, name, digits in (("eer_pct", "EER (%)", 3), ("mindcf_0.01", "minDCF (p=0.01)", 4),
                              ("mindcf_0.05", "minDCF (p=0.05)", 4)):
        r = result[key]
        print(f"{name:<16}  {r['a']:>9.{digits}f}  {r['b']:>9.{digits}f}  {r['diff']:>+9.{digits}f}  "
              f"{_interval(r['ci'], digits):>22}")
    eer = result["eer_pct"]
    verdict = "excludes 0" if eer["excludes_zero"] else "contains 0"
    if "note" not in result:  # a small list's interval under-covers: it is reported, never called significant
        verdict += ": the systems differ" if eer["significant"] else ": no significant difference"
    print(f"EER difference A - B = {eer['diff']:+.3f} points, 95% CI {_interval(eer['ci'], 3)} {verdict} "
          f"(bootstrap p {_p_value(eer['p_value'], args.replicates)})")
    if "note" in result:
        print(f"note: {result['note']}")
    if args.json is not None:
        write_json(args.json, {"a": str(path_a), "b": str(path_b), "trials": str(args.trials)} | result)
    return 0


# ------------------------------------------------------------------------------------ calibrate


def _calibrate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trials", required=True, type=Path, help="calibration trial list (with labels)")
    p.add_argument("--embeddings", required=True, type=Path, help="embeddings .npz of the trial utterances")
    _norm_args(p)
    # names are checked by svlib.scoring.calibration (importing it here would slow every `svlib --help`)
    p.add_argument("--quality", nargs="*", default=[], metavar="NAME",
                   help="quality measures added to the score: log_dur_min log_dur_max norm_min norm_max")
    p.add_argument("--p-target", type=float, default=0.05, help="effective prior of the logistic loss")
    p.add_argument("--out", required=True, type=Path, help="calibration JSON to write")


def _calibrate(args: argparse.Namespace) -> int:
    from svlib.scoring.calibration import cllr, fit_calibration, min_cllr

    _check_output(args.out, ".json", "--out")
    trials, table, scores = _load_scores(args)
    cal = fit_calibration(scores, trials.labels, table, trials, ["score", *args.quality], args.p_target)
    # what `score --calibration` checks: a calibration only fits scores normalised the same way
    cal.meta.update({"trials": str(args.trials), "asnorm": _requested_norm(args),
                     "enroll": None if args.enroll is None else str(args.enroll)})
    cal.save(args.out)
    llrs = cal.apply(scores, table, trials)
    _print_table([("features", ",".join(cal.features)),
                  ("Cllr (bits)", f"{cllr(llrs, trials.labels):.4f}"),
                  ("minCllr (bits)", f"{min_cllr(scores, trials.labels):.4f}")])
    print(f"wrote {args.out}")
    return 0


# ---------------------------------------------------------------------------------------- model use
# embed / verify / calibrate-model / info: a model folder (svlib.package) applied to audio.


def _model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, type=Path, help="svlib model folder (svlib_model.json, encoder/, ...)")


def _device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--max-seconds", type=float, default=60.0,
                   help="use at most this much of each file (default 60); longer files are cut and a note says "
                        "so, unless --windowed")
    p.add_argument("--max-batch-seconds", type=float, default=240.0,
                   help="padded audio per batch; utterances are batched by length (default 240)")
    p.add_argument("--min-dbfs", type=float, default=DEFAULT_MIN_DBFS,
                   help=f"refuse audio whose RMS level is below this many dB re full scale (default "
                        f"{DEFAULT_MIN_DBFS:g}; -inf: no check): silent files would otherwise 'match' each other")


def _windowed_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--windowed", action="store_true",
                   help="embed files longer than --max-seconds whole: in equal windows of at most --max-seconds, "
                        "averaging the length-normalised window embeddings")


def _eval_config(args: argparse.Namespace, max_seconds: float | None = None, progress: bool = False):
    from svlib.evaluate import EvalConfig

    if not args.max_seconds > 0 or not math.isfinite(args.max_seconds):
        raise ValueError(f"--max-seconds must be a positive number, got {args.max_seconds}")
    if math.isnan(args.min_dbfs) or args.min_dbfs == math.inf:
        raise ValueError(f"--min-dbfs must be a number of dB or -inf (no check), got {args.min_dbfs}")
    return EvalConfig(max_seconds=args.max_seconds if max_seconds is None else max_seconds,
                      max_batch_seconds=args.max_batch_seconds, progress=progress, flag_narrowband=True,
                      min_rms_dbfs=None if math.isinf(args.min_dbfs) and args.min_dbfs < 0 else args.min_dbfs)


def _check_audio(path: str):
    """Header facts (``svlib.audio.AudioInfo``) of ``path``; errors name the file before the model loads.

    A file holding less audio than its header declares is embedded as far as it goes, with a warning naming
    both lengths (and ``embed`` flags it "truncated" in the embeddings file): see ``AudioInfo.truncated``.
    """
    from svlib.audio import AudioError, audio_info
    from svlib.features import MIN_SAMPLES, SAMPLE_RATE

    if not os.path.isfile(path):
        raise AudioError(f"{path}: audio file not found")
    info = audio_info(path)
    if info.frames == 0:
        raise AudioError(f"{path}: empty audio (a header without samples)")
    seconds = info.seconds
    if seconds * SAMPLE_RATE < MIN_SAMPLES:
        raise AudioError(f"{path}: too short ({seconds * 1000:.0f} ms); the model needs at least "
                         f"{1000 * MIN_SAMPLES / SAMPLE_RATE:.0f} ms of audio")
    if info.truncated:
        _warn(f"{path}: truncated audio data: the header declares {info.declared_seconds:.2f} s, the file holds "
              f"{seconds:.2f} s; using the {seconds:.2f} s present")
    return info


def _wav_ids(paths: list[str]) -> dict[str, str]:
    """``--wav`` files -> ``{utt: path}``: the path is the id, with whitespace replaced by '_' (Kaldi ids hold
    no spaces) and '-2', '-3'... appended when two paths would give the same id."""
    out: dict[str, str] = {}
    for path in paths:
        base = "_".join(str(path).split()) or "utt"
        utt, k = base, 1
        while utt in out:
            k += 1
            utt = f"{base}-{k}"
        out[utt] = str(path)
    return out


def _windows(seconds: float, max_seconds: float) -> list[tuple[float, float]]:
    """``ceil(seconds / max_seconds)`` equal windows covering the file (no short last window)."""
    n = max(1, math.ceil(seconds / max_seconds - 1e-9))
    width = seconds / n
    return [(round(k * width, 6), round(seconds if k == n - 1 else (k + 1) * width, 6)) for k in range(n)]


def _embed_files(model, wavs: dict[str, str], seconds: dict[str, float], args: argparse.Namespace, device: str):
    """Embeddings of whole files: capped at --max-seconds (with a note naming the cut files), or with
    --windowed the unit-normalised mean of equal windows (``svlib.scoring.enroll.enroll_models``)."""
    from svlib.data.lists import DataDir
    from svlib.evaluate import extract_embeddings

    progress = not getattr(args, "no_progress", True)
    long = sorted((u for u in wavs if seconds[u] > args.max_seconds), key=lambda u: -seconds[u])
    if not (getattr(args, "windowed", False) and long):
        if long:
            _note(f"{len(long)} file(s) longer than --max-seconds {args.max_seconds:g} were cut to their first "
                  f"{args.max_seconds:g} s (longest: {wavs[long[0]]}, {seconds[long[0]]:.1f} s); --windowed embeds "
                  "them whole")
        data = DataDir(wavs=dict(wavs), utt2spk={u: u for u in wavs},
                       durations={u: seconds[u] for u in wavs})
        return extract_embeddings(model, data, list(wavs), _eval_config(args, progress=progress), device=device)
    from svlib.scoring.enroll import enroll_models

    pieces: dict[str, list[str]] = {}
    win_wavs, segments = {}, {}
    for utt, path in wavs.items():
        pieces[utt] = []
        for k, (start, end) in enumerate(_windows(seconds[utt], args.max_seconds)):
            win = f"{utt}#w{k}"
            pieces[utt].append(win)
            win_wavs[win], segments[win] = path, (start, end)
    data = DataDir(wavs=win_wavs, utt2spk={w: w for w in win_wavs}, segments=segments)
    table = extract_embeddings(model, data, list(win_wavs), _eval_config(args, max_seconds=None, progress=progress),
                               device=device)
    table.set_durations({w: end - start for w, (start, end) in segments.items()})
    return enroll_models(table, pieces)


def _embed_args(p: argparse.ArgumentParser) -> None:
    _model_arg(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--wav", nargs="+", metavar="WAV",
                     help="audio files (their paths become the utterance ids, whitespace replaced by '_')")
    src.add_argument("--scp", type=Path, help="Kaldi wav.scp: '<utt> <path>' per line (no command pipes)")
    p.add_argument("--out", required=True, type=Path, help="embeddings .npz to write (utts, embeddings, durations)")
    _device_arg(p)
    _windowed_arg(p)
    p.add_argument("--skip-bad", action="store_true",
                   help="skip unreadable, too short or silent files (each is listed with its reason) instead of "
                        "stopping at the first")
    p.add_argument("--checkpoint-every", type=int, default=CHECKPOINT_EVERY, metavar="N",
                   help=f"save the embeddings so far to OUT.partial.npz every N utterances (default "
                        f"{CHECKPOINT_EVERY}); a rerun of the same command resumes from it while the model's "
                        "weights and the list are unchanged")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _partial_paths(out: Path) -> tuple[Path, Path]:
    return out.with_name(out.name + ".partial.npz"), out.with_name(out.name + ".partial.json")


def _list_digest(wavs: dict[str, str]) -> str:
    """sha256 of the list as ``utt -> absolute path`` pairs (order-free): the same ids naming other files (an
    edited wav.scp, relative --wav paths from another folder) are another list."""
    import hashlib
    import json

    pairs = sorted((utt, os.path.abspath(path)) for utt, path in wavs.items())
    return hashlib.sha256(json.dumps(pairs).encode("utf-8")).hexdigest()


def _stale_partial(recorded: dict, inputs: dict) -> str | None:
    """Why a partial recorded with ``recorded`` was made from other inputs than ``inputs``, or None."""
    was = recorded.get("model_sha256")
    if not isinstance(was, str):
        return "it does not record which model weights made it (an older svlib wrote it)"
    if was != inputs["model_sha256"]:
        return (f"made with other model weights (sha256 {was[:12]}, {inputs['model']} now has "
                f"{inputs['model_sha256'][:12]})")
    if recorded.get("list_sha256") != inputs["list_sha256"]:
        return "made from another list (other utterance ids or files)"
    return None


def _resume(out: Path, settings: dict, inputs: dict, wavs: dict[str, str]):
    """The embeddings, seconds and narrow-band utterances of an interrupted run of the same command, or None.

    ``inputs`` holds the digests of the model weights and of the list. A partial of other weights (retrained
    into the same folder) or of another list is never right for this run: a note says why, both files are
    deleted (a kill between this run's first writes of the two must not pair new digests with old
    embeddings) and the run starts over; refusing would only make the user delete them by hand. Other
    ``settings`` are refused instead: they come from this command line, the partial is still right for the
    command that made it, and the user decides which one was meant."""
    import json

    from svlib.scoring.metrics import load_embeddings

    partial, info = _partial_paths(out)
    if not partial.is_file():
        return None
    try:
        recorded = json.loads(info.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        recorded = None
    stale = _stale_partial(recorded if isinstance(recorded, dict) else {}, inputs)
    if stale is not None:
        _note(f"{partial}: not resumed, {stale}; deleted, embedding all {len(wavs)} utterances again")
        partial.unlink(missing_ok=True)
        info.unlink(missing_ok=True)
        return None
    recorded_settings = {key: recorded.get(key) for key in settings}
    if recorded_settings != settings:
        raise ValueError(f"{partial}: partial embeddings of a run with other settings ({info} says "
                         f"{recorded_settings}, this run is {settings}); delete both files to start over")
    table = load_embeddings(partial)
    keep = [u for u in table.utts if u in wavs]
    _note(f"resuming from {partial}: {len(keep)} of {len(wavs)} utterances already embedded")
    durations = table.durations if table.durations is not None else [math.nan] * len(table.utts)
    seconds = dict(zip(table.utts, map(float, durations)))
    return {u: table[u] for u in keep}, {u: seconds[u] for u in keep}, set(table.flagged("narrowband", keep))


def _embed(args: argparse.Namespace) -> int:
    import numpy as np

    from svlib.audio import AudioError
    from svlib.data.lists import read_scp
    from svlib.evaluate import EmbeddingRunError, SilentAudioError
    from svlib.files import write_json
    from svlib.package import check_model_folder, load_model, model_digest
    from svlib.scoring.metrics import save_embeddings

    # everything cheap first: output, device, model folder, list, audio headers; then the model
    _check_output(args.out, ".npz", "--out")
    _check_device(args.device)
    if args.checkpoint_every < 1:
        raise ValueError(f"--checkpoint-every must be >= 1, got {args.checkpoint_every}")
    _eval_config(args)
    if not args.model.is_dir():
        raise FileNotFoundError(f"{args.model}: model folder not found")
    check_model_folder(args.model)
    wavs = read_scp(args.scp) if args.scp is not None else _wav_ids(args.wav)
    seconds, skipped, truncated = {}, {}, set()
    for utt, path in wavs.items():
        try:
            info = _check_audio(path)
            seconds[utt] = info.seconds
            if info.truncated:
                truncated.add(utt)
        except (AudioError, OSError) as err:
            if not args.skip_bad:
                raise AudioError(f"{err}" + ("; --skip-bad embeds the other files" if len(wavs) > 1 else "")) from None
            skipped[utt] = str(err)
    settings = {"max_seconds": args.max_seconds, "windowed": bool(args.windowed), "min_dbfs": args.min_dbfs}
    # what the partial embeddings were made from, by content: the same folder retrained is another model
    inputs = {"model": str(args.model.resolve()), "model_sha256": model_digest(args.model),
              "list_sha256": _list_digest(wavs)}
    partial, info = _partial_paths(args.out)
    resumed = _resume(args.out, settings, inputs, wavs)
    done, done_seconds, narrowband = resumed if resumed is not None else ({}, {}, set())
    todo = sorted((u for u in seconds if u not in done), key=lambda u: (-seconds[u], u))
    model = load_model(args.model).to(args.device) if todo else None

    def durations_of(utt):
        return done_seconds.get(utt, seconds[utt] if args.windowed else min(seconds[utt], args.max_seconds))

    def flags_of(utts):
        return {"narrowband": [u in narrowband for u in utts], "truncated": [u in truncated for u in utts]}

    def checkpoint():
        utts = list(done)
        if utts:
            write_json(info, settings | inputs)
            save_embeddings(partial, utts, np.stack([done[u] for u in utts]), durations=[durations_of(u) for u in utts],
                            flags=flags_of(utts))

    for a in range(0, len(todo), args.checkpoint_every):
        chunk = todo[a:a + args.checkpoint_every]
        try:
            table = _embed_files(model, {u: wavs[u] for u in chunk}, seconds, args, args.device)
            narrowband.update(table.flagged("narrowband"))
        except (AudioError, SilentAudioError, EmbeddingRunError, MemoryError) as err:
            if not args.skip_bad:
                checkpoint()
                kept = f"; {len(done)} embeddings kept in {partial}, rerun to resume" if done else ""
                raise type(err)(f"{err}{kept}") from None
            table = {}
            for utt in chunk:  # one at a time, to find the bad ones
                try:
                    single = _embed_files(model, {utt: wavs[utt]}, seconds, args, args.device)
                    table.update(single)
                    narrowband.update(single.flagged("narrowband"))
                except (AudioError, SilentAudioError, EmbeddingRunError, MemoryError) as one:
                    skipped[utt] = str(one)
        done.update({u: np.asarray(v) for u, v in table.items()})
        checkpoint()
    for utt, why in skipped.items():
        print(f"svlib embed: skipped {utt}: {why}", file=sys.stderr)
    utts = [u for u in wavs if u in done]
    if not utts:
        raise AudioError(f"{args.scp or 'the --wav files'}: no file could be embedded ({len(skipped)} skipped)")
    save_embeddings(args.out, utts, np.stack([done[u] for u in utts]), durations=[durations_of(u) for u in utts],
                    flags=flags_of(utts))
    _narrowband_note([wavs[u] for u in utts if u in narrowband], len(utts), f"; flagged 'narrowband' in {args.out}")
    partial.unlink(missing_ok=True)
    info.unlink(missing_ok=True)
    dim = next(iter(done.values())).shape[0]
    extra = f" ({len(skipped)} skipped)" if skipped else ""
    print(f"wrote {len(utts)} embeddings of dimension {dim} to {args.out}{extra}")
    return 0


def _verify_args(p: argparse.ArgumentParser) -> None:
    _model_arg(p)
    p.add_argument("wavs", nargs=2, metavar="WAV", help="enrolment and test audio")
    p.add_argument("--threshold-kind", choices=("bayes", "eer"), default="bayes",
                   help="calibrated Bayes threshold on the LLR (default) or the calibration list's EER threshold")
    p.add_argument("--threshold", type=float, help="use this cosine-score threshold instead of calibration.json")
    p.add_argument("--allow-narrowband", action="store_true",
                   help="decide on narrow-band audio (recorded below 16 kHz or with nothing above 4.25 kHz) although "
                        "the calibration was fitted on wide-band trials: such audio of different speakers often matches")
    _device_arg(p)
    _windowed_arg(p)


def _verify(args: argparse.Namespace) -> int:
    import torch

    from svlib.package import CALIBRATION_FILE, check_model_folder, load_model, read_calibration_thresholds

    # the decision rule first, then the audio headers: all before the (slow) model load
    _finite(args.threshold, "--threshold")
    _check_device(args.device)
    _eval_config(args)
    if not args.model.is_dir():
        raise FileNotFoundError(f"{args.model}: model folder not found")
    check_model_folder(args.model)
    infos = {name: _check_audio(path) for name, path in zip(("enroll", "test"), args.wavs)}
    seconds = {name: info.seconds for name, info in infos.items()}
    thresholds = read_calibration_thresholds(args.model)
    if args.threshold is None and thresholds is None:
        raise FileNotFoundError(
            f"{args.model / CALIBRATION_FILE}: no calibration in the model folder, so no accept/reject threshold; "
            f"create it with `svlib calibrate-model --model {args.model} --data DATA_DIR --trials TRIALS` "
            "or pass --threshold")
    _check_narrowband(args, infos, None if args.threshold is not None else thresholds["calibration"])
    model = load_model(args.model).to(args.device)
    table = _embed_files(model, dict(zip(("enroll", "test"), args.wavs)), seconds, args, args.device)
    emb = torch.from_numpy(table.matrix.astype("float64"))
    score = float(torch.nn.functional.cosine_similarity(emb[table.index["enroll"]], emb[table.index["test"]], dim=0))
    print(f"score      {score:.4f}  (cosine)")
    value, name = score, "score"
    if args.threshold is not None:
        threshold, why = args.threshold, "cosine, given with --threshold"
    elif args.threshold_kind == "eer":
        t = thresholds["eer"]
        threshold = t["score"]
        why = (f"cosine EER threshold of the calibration list ({t.get('eer_pct', math.nan):.2f}% EER on "
               f"{thresholds.get('trials', '?')}), {args.model / CALIBRATION_FILE}")
    else:
        t = thresholds["bayes"]
        llr = float(thresholds["calibration"].apply([score])[0])
        print(f"llr        {llr:.4f}  (calibrated log-likelihood ratio)")
        # decide on the LLR itself: the calibration, not a cosine threshold derived from it, is the model
        value, name, threshold = llr, "llr", t["llr"]
        why = f"Bayes threshold on the LLR = -logit(P(target)={t['prior']}), {args.model / CALIBRATION_FILE}"
    print(f"threshold  {threshold:.4f}  ({why})")
    accept = value >= threshold
    print(f"decision   {'accept' if accept else 'reject'}  ({name} {value:.4f} {'>=' if accept else '<'} "
          f"{threshold:.4f}; same speaker: {'yes' if accept else 'no'})")
    return 0


def _check_narrowband(args: argparse.Namespace, infos: dict, calibration) -> None:
    """Refuse a decision on narrow-band audio (``svlib.audio.is_narrowband``, measured on what the model will
    read) unless ``calibration`` was fitted on narrow-band trials or ``--allow-narrowband`` is given: 8 kHz
    recordings of two different speakers scored LLR 6.8 ("accept") with a calibration fitted on 16 kHz
    trials. A --threshold (no calibration) is no evidence about narrow-band audio either."""
    from svlib.audio import NARROWBAND_NOTE, AudioError, is_narrowband, load_audio
    from svlib.package import CALIBRATION_FILE, calibrated_on_narrowband

    narrow = [path for path, info in zip(args.wavs, infos.values())
              if is_narrowband(load_audio(path, max_seconds=args.max_seconds), info.sample_rate)]
    if not narrow:
        return
    fitted = calibration is not None and calibrated_on_narrowband(calibration.meta)
    if args.allow_narrowband or fitted:
        why = "--allow-narrowband" if args.allow_narrowband else "the calibration was fitted on narrow-band trials"
        _narrowband_note(narrow, len(args.wavs), f"; deciding anyway ({why})")
        return
    rule = (f"{args.model / CALIBRATION_FILE} was fitted on wide-band trials" if calibration is not None
            else "--threshold was not chosen on narrow-band trials")
    raise AudioError(f"{narrow[0]}: {NARROWBAND_NOTE}; refusing a decision: {rule} (calibrate the model on "
                     "narrow-band trials with `svlib calibrate-model`, or pass --allow-narrowband)")


def _calibrate_model_args(p: argparse.ArgumentParser) -> None:
    _model_arg(p)
    p.add_argument("--data", required=True, type=Path, help="Kaldi data dir (wav.scp, utt2spk) of the trial audio")
    p.add_argument("--trials", required=True, type=Path, help="labelled calibration trial list")
    p.add_argument("--prior", type=float, default=0.5,
                   help="P(target) of the Bayes decision threshold: LLR >= -logit(prior) (default 0.5: LLR >= 0)")
    p.add_argument("--p-target", type=float, default=0.5, help="effective prior of the logistic calibration loss")
    _device_arg(p)
    p.add_argument("--no-progress", action="store_true")


def _calibrate_model(args: argparse.Namespace) -> int:
    from svlib.data.lists import DataDir, ListError, read_trials
    from svlib.evaluate import extract_embeddings
    from svlib.package import (CALIBRATION_FILE, NARROWBAND_META, check_model_folder, describe, load_model,
                               write_model_card)
    from svlib.scoring.calibration import cllr, fit_calibration, min_cllr
    from svlib.scoring.metrics import compute_eer, cosine_scores

    if not 0.0 < args.prior < 1.0:
        raise ValueError(f"--prior must be in (0, 1), got {args.prior}")
    _check_device(args.device)
    cfg = _eval_config(args, progress=not args.no_progress)
    check_model_folder(args.model)
    # calibration.json and the model card go into the model folder: a read-only one is refused now, not
    # after embedding every trial utterance
    _check_output(args.model / CALIBRATION_FILE, ".json", "--model")
    trials = read_trials(args.trials)
    data = DataDir.load(args.data, check_files=True)
    unknown = sorted(trials.utterances - set(data.wavs))
    if unknown:
        raise ListError(f"{args.trials}: utterance {unknown[0]!r} is not in {args.data}/wav.scp "
                        f"({len(unknown)} unknown)")
    long = [u for u in sorted(trials.utterances) if data.seconds(u) > args.max_seconds]
    if long:
        _note(f"{len(long)} of {len(trials.utterances)} trial utterances are longer than --max-seconds "
              f"{args.max_seconds:g} and are cut to their first {args.max_seconds:g} s (e.g. {long[0]})")
    model = load_model(args.model).to(args.device)
    table = extract_embeddings(model, data, trials.utterances, cfg, device=args.device)
    narrowband = table.flagged("narrowband", sorted(trials.utterances))
    _narrowband_note(narrowband, len(trials.utterances), f" (recorded in {args.model / CALIBRATION_FILE})")
    scores = cosine_scores(table, trials, source=str(args.trials))
    cal = fit_calibration(scores, trials.labels, features=["score"], p_target=args.p_target)
    slope = float(cal.weights[0])
    if not slope > 0:
        raise ValueError(f"{args.trials}: calibration slope {slope:.4g} is not positive (scores do not separate "
                         "targets from non-targets); cannot derive a threshold")
    llr_threshold = 0.0 - math.log(args.prior / (1.0 - args.prior))  # 0.0 - : no "-0.000" at prior 0.5
    eer, eer_threshold = compute_eer(scores, trials.labels)
    thresholds = {
        "bayes": {"score": (llr_threshold - cal.bias) / slope, "llr": llr_threshold, "prior": args.prior},
        "eer": {"score": eer_threshold, "eer_pct": 100.0 * eer},
        "trials": str(args.trials),
        "num_trials": len(trials),
    }
    llrs = cal.apply(scores)
    cal.meta.update({"thresholds": thresholds, "asnorm": None, "cllr": cllr(llrs, trials.labels),
                     "min_cllr": min_cllr(scores, trials.labels),
                     # what `verify` checks before deciding on narrow-band input (package.calibrated_on_narrowband)
                     NARROWBAND_META: {"utterances": len(narrowband), "of": len(trials.utterances)}})
    path = cal.save(args.model / CALIBRATION_FILE)
    write_model_card(args.model, {**describe(model), "calibration_trials": str(args.trials)})
    _print_table([("trials", f"{len(trials)}"),
                  ("EER (%)", f"{100 * eer:.3f}"),
                  ("EER threshold", f"{eer_threshold:.4f}"),
                  ("Bayes threshold", f"{thresholds['bayes']['score']:.4f}"),
                  ("Cllr (bits)", f"{cal.meta['cllr']:.4f}"),
                  ("minCllr (bits)", f"{cal.meta['min_cllr']:.4f}")])
    print(f"wrote {path} (Bayes threshold at LLR >= {llr_threshold:.3f}, P(target) = {args.prior})")
    return 0


def _convert_reference_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", type=Path, metavar="CKPT.pth",
                   help="reference checkpoint (model_lmft_0.14.pth layout)")
    p.add_argument("--frontend", default="w2v-bert-2.0",
                   help="encoder preset or HF encoder folder (default w2v-bert-2.0)")
    p.add_argument("--out", required=True, type=Path, help="model folder to write")
    p.add_argument("--lora-alpha", type=float, help="LoRA alpha, for checkpoints with unmerged LoRA weights")
    p.add_argument("--trusted", action="store_true", help="allow arbitrary pickled objects (only for files you trust)")


def _convert_reference(args: argparse.Namespace) -> int:
    from svlib.package import convert_reference_checkpoint

    out = convert_reference_checkpoint(args.checkpoint, args.frontend, args.out, lora_alpha=args.lora_alpha,
                                       trusted=args.trusted)
    print(f"wrote {out}")
    return 0


def _info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, metavar="DIR", help="svlib model folder")
    p.add_argument("--json", action="store_true", help="print the description as JSON")
    p.add_argument("--seconds", type=float, default=3.0,
                   help="utterance length for MACs per second (attention is quadratic in time; default 3)")


def _info(args: argparse.Namespace) -> int:
    import json

    from svlib.package import describe, load_model, read_calibration_thresholds

    if args.seconds <= 0:
        raise ValueError(f"--seconds must be positive, got {args.seconds}")
    model = load_model(args.model)
    info = describe(model, seconds=args.seconds)
    thresholds = read_calibration_thresholds(args.model)
    if args.json:
        if thresholds is not None:
            info["calibration"] = {k: v for k, v in thresholds.items() if k != "calibration"}
        print(json.dumps(info, indent=2))
        return 0
    enc = info["encoder"]
    print(f"# {args.model}")
    _print_table([
        ("parameters (total)", f"{info['params_total']:,}"),
        ("parameters (encoder)", f"{info['params_encoder']:,}"),
        ("parameters (back-end)", f"{info['params_backend']:,}"),
        (f"MACs/s of audio ({args.seconds:g} s utts)", f"{info['macs_per_second'] / 1e6:.2f}M"),
        ("  encoder", f"{info['macs_per_second_encoder'] / 1e6:.2f}M"),
        ("  back-end", f"{info['macs_per_second_backend'] / 1e6:.2f}M"),
        ("encoder", f"{enc['num_layers']}x{enc['hidden_size']}"),
        ("back-end", f"{info['backend']['type']}/{info['backend']['embed_dim']}"),
        ("feature normalisation", info["features_normalise"]),
        ("pruned", "yes" if info["pruned"] else "no"),
    ])
    dense = info["dense_layer_sizes"]
    print(f"{'layer':>5}  {'heads':>7}  {'ffn1':>9}  {'ffn2':>9}  {'conv':>9}")
    for i, s in enumerate(info["layers"]):
        print(f"{i:>5}  " + "  ".join(f"{f'{s[k]}/{dense[k]}':>{7 if k == 'heads' else 9}}"
                                      for k in ("heads", "ffn1", "ffn2", "conv")))
    if thresholds is not None:
        bayes, eer = thresholds["bayes"], thresholds["eer"]
        print(f"calibrated thresholds: Bayes {bayes['score']:.4f} (LLR >= {bayes['llr']:.3f}), EER {eer['score']:.4f}")
    else:
        print("no calibration.json (svlib calibrate-model creates one)")
    return 0


# ------------------------------------------------------------------------------------- registry

COMMANDS: list[Command] = [
    Command("score", "cosine-score a trial list (optionally with enrolment models, AS-norm, calibration) and "
                     "print EER / minDCF", _score_args, _score),
    Command("compare", "paired speaker-level bootstrap of the EER / minDCF difference of two score files on "
                       "the same trials", _compare_args, _compare),
    Command("calibrate", "train a (quality-measure) score calibration on a labelled trial list",
            _calibrate_args, _calibrate),
    Command("embed", "embed audio files with a model folder (batched by length) into an .npz", _embed_args, _embed),
    Command("verify", "score two audio files and accept/reject at the model's calibrated threshold",
            _verify_args, _verify),
    Command("calibrate-model", "fit the model folder's score calibration and thresholds on a trial list",
            _calibrate_model_args, _calibrate_model),
    Command("info", "parameters, MACs per second of audio and per-layer (pruned) structure of a model folder",
            _info_args, _info),
    Command("convert-reference", "turn a reference-recipe checkpoint (model_lmft_0.14.pth) into a model folder",
            _convert_reference_args, _convert_reference),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="svlib", description="Speaker verification toolkit")
    parser.add_argument("--traceback", action="store_true", help="show the Python traceback on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in COMMANDS:
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.add_arguments(p)
        p.set_defaults(_run=cmd.run)
    return parser


def _one_line(err: BaseException) -> str:
    """The message of an expected failure as one line (KeyError's str() is the repr of its key; svlib's own
    KeyErrors, MissingEmbeddingError, print plainly; an OSError gets its file name when the text lacks it)."""
    if type(err) is KeyError:
        msg = f"missing key {err}"
    elif isinstance(err, MemoryError):
        msg = str(err) or "out of memory"
        if "memory" not in msg.lower():
            msg = f"out of memory ({msg})"
    else:
        msg = str(err) or type(err).__name__
    if isinstance(err, OSError) and err.filename is not None and str(err.filename) not in msg:
        msg = f"{err.filename}: {msg}"
    return " ".join(msg.split())


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the subcommand, return its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (ValueError, KeyError, OSError, RuntimeError, MemoryError) as err:
        if args.traceback or os.environ.get("SVLIB_TRACEBACK"):
            raise
        print(f"svlib {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
