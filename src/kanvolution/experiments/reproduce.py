"""The paper's experiment: a hyperparameter search per model, a final run, a results table.

The search is an Optuna study per (model, grid size) in a database, so that an interrupted
search resumes where it stopped and several machines can share one study.
"""

from __future__ import annotations

import os
import socket
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .config import TrainConfig, model_takes_grid_size
from .files import RunFolderError, atomic_write, write_json
from .schema import FINISHED, load_results
from .tables import PAPER_RESULTS, PAPER_SELECTIONS, markdown_table, rows_from_results, seed_table
from .training import NonFiniteLossError, train

__all__ = [
    "BEYOND_MODELS",
    "BEYOND_RECIPE",
    "SEEDED_PROTOCOLS",
    "BASES_MODEL",
    "FIXED_HPARAMS",
    "PAPER_GRID",
    "PAPER_MODELS",
    "ReproduceConfig",
    "paper_combinations",
    "plot_accuracy_vs_params",
    "bases_table",
    "reproduce",
    "run_search",
]

# The paper's protocol: the search grid, its seed and size, the epoch budget and the split.
PAPER_GRID: dict[str, tuple[float | int, ...]] = {
    "lr": (1e-4, 5e-4, 1e-3),
    "weight_decay": (0.0, 1e-5, 1e-4),
    "batch_size": (32, 64, 128),
}
PAPER_SEED = 42
PAPER_COMBINATIONS = 8
PAPER_MAX_EPOCHS = 20
PAPER_VAL_FRACTION = 0.2
FIXED_HPARAMS: dict[str, float | int] = {"lr": 1e-3, "weight_decay": 1e-4, "batch_size": 128}
PROTOCOLS = ("paper", "paper-configs", "fixed", "beyond", "bases")  # see ReproduceConfig.protocol
SEEDED_PROTOCOLS = ("paper-configs", "beyond", "bases")  # once per seed; these take table_only
# The models of the paper's table (CKAN_BN has no published number; pass it explicitly).
PAPER_MODELS = (
    "cnn_more_convs",
    "cnn_big",
    "cnn_medium",
    "cnn_small",
    "conv_kan_medium",
    "conv_kan_small",
    "kanc_mlp_big",
    "kanc_mlp_medium",
    "kanc_mlp_small",
    "kkan_medium",
    "kkan_small",
)
# The "beyond" protocol: small KAN-conv nets and their matched CNNs, one modern recipe for both.
BEYOND_MODELS = ("kan_small_net", "cnn_small_net_matched", "kan_bottleneck_net", "cnn_bottleneck_net_matched",
                 "kan_stem_bottleneck_net", "kan_early_bottleneck_net")
BEYOND_RECIPE: dict[str, Any] = {
    "batch_size": 128,
    "lr": 2e-3,
    "weight_decay": 1e-2,
    "lr_schedule": "warmup-cosine",
    "warmup_epochs": 1,
    "label_smoothing": 0.1,
    "crop_padding": 2,
    "val_fraction": 0.1,  # 6000 validation images choose the reported epoch
}
# A trial whose process died keeps the state RUNNING; once its heartbeat is GRACE_BEATS beats
# old it is marked failed and its combination is queued again (its run folder resumes from the
# checkpoint).
HEARTBEAT_SECONDS = 20
GRACE_BEATS = 3


def paper_combinations(n: int = PAPER_COMBINATIONS, seed: int = PAPER_SEED) -> list[dict[str, float | int]]:
    """The paper's random hyperparameter combinations, in the order it draws them.

    The paper seeds NumPy's global generator with 42 and then, for each combination in turn,
    calls ``np.random.choice`` once per hyperparameter in the order lr, weight decay, batch
    size. Draws are with replacement, so a combination can repeat (with this grid the 8th
    repeats the 6th). ``RandomState(42)`` yields the same draws without touching the global
    generator.

    Examples:
        >>> paper_combinations(2)
        [{'lr': 0.001, 'weight_decay': 0.0, 'batch_size': 128}, {'lr': 0.001, 'weight_decay': 0.0, 'batch_size': 32}]
    """
    rng = np.random.RandomState(seed)
    combos = []
    for _ in range(n):
        combo = {key: rng.choice(values).item() for key, values in PAPER_GRID.items()}
        combo["lr"], combo["weight_decay"] = float(combo["lr"]), float(combo["weight_decay"])
        combo["batch_size"] = int(combo["batch_size"])
        combos.append(combo)
    return combos


@dataclass
class ReproduceConfig:
    """Options of :func:`reproduce`."""

    out: str  # output folder: study.db, one folder per model, table.md
    dataset: str = "fashion-mnist"  # the paper's table is on Fashion-MNIST
    models: Sequence[str] = PAPER_MODELS  # registry names
    grid_sizes: Sequence[int] = (10, 20)  # for models with KAN layers; plain CNNs get one row
    # "paper" = search then retrain; "paper-configs" = the paper's own search winners (its logs),
    # once per seed in `seeds`; "fixed" = FIXED_HPARAMS; "beyond" = BEYOND_RECIPE for `epochs`,
    # once per seed in `seeds`, at each model's own default grid size; "bases" = BASES_MODEL with
    # every basis family in `bases` at matched size, FIXED_HPARAMS, `epochs` epochs, once per seed
    protocol: Literal["paper", "paper-configs", "fixed", "beyond", "bases"] = "paper"
    epochs: int = PAPER_MAX_EPOCHS  # search budget per trial ("paper") or training length ("fixed")
    trials: int = PAPER_COMBINATIONS  # how many of the paper's combinations the search runs
    storage: str | None = None  # Optuna storage URL; None = sqlite:///OUT/study.db
    search_only: bool = False  # run the search trials but not the final trainings (extra workers)
    table_only: bool = False  # seeded protocols: write the table from the runs in `out`, train nothing
    zoo: str | None = None  # "beyond": a folder of runs of the paper's zoo to plot beside its models
    data_dir: str | None = None
    download: bool = True
    max_train_samples: int | None = None  # subsample for quick runs and tests
    max_test_samples: int | None = None
    device: str = "auto"
    num_threads: int | None = None
    progress: bool | None = None
    seed: int = 0  # torch seed of every training run (the paper's)
    seeds: Sequence[int] = (0, 1, 2)  # torch seeds of the "paper-configs", "beyond" and "bases" protocols
    bases: Sequence[str] | None = None  # basis families of the "bases" protocol; None = all
    heartbeat: int = HEARTBEAT_SECONDS  # a running trial proves its worker alive this often (seconds)
    extra: dict[str, Any] = field(default_factory=dict)  # further TrainConfig options

    def train_config(self, model: str, grid_size: int | None, **options: Any) -> TrainConfig:
        base = {
            "model": model,
            "grid_size": grid_size,
            "dataset": self.dataset,
            "data_dir": self.data_dir,
            "download": self.download,
            "max_train_samples": self.max_train_samples,
            "max_test_samples": self.max_test_samples,
            "device": self.device,
            "num_threads": self.num_threads,
            "progress": self.progress,
            "seed": self.seed,
        }
        return TrainConfig(**{**base, **self.extra, **options})


def _run_tag(model: str, grid_size: int | None) -> str:
    return model if grid_size is None else f"{model}_gs{grid_size}"


def _combo_tag(combo: dict[str, Any]) -> str:
    return f"lr{combo['lr']:g}_wd{combo['weight_decay']:g}_bs{combo['batch_size']}"


def _study_name(cfg: ReproduceConfig, model: str, grid_size: int | None) -> str:
    # Every option that changes a trial's outcome is in the name, so different settings never
    # share a study.
    name = f"{cfg.dataset}/{_run_tag(model, grid_size)}/paper-search/epochs{cfg.epochs}/seed{cfg.seed}"
    if cfg.max_train_samples is not None:
        name += f"/train{cfg.max_train_samples}"
    for key, value in sorted(cfg.extra.items()):
        name += f"/{key}={value}"
    return name


def _storage(url: str, heartbeat: int, attempts: int = 5) -> Any:
    import optuna
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    for attempt in range(1, attempts + 1):
        try:
            return optuna.storages.RDBStorage(url, heartbeat_interval=heartbeat, grace_period=GRACE_BEATS * heartbeat)
        except (IntegrityError, ProgrammingError):
            # Workers that start together on an empty database race to create its tables; the
            # ones that lose find them made on the next attempt.
            if attempt == attempts:
                raise
            time.sleep(0.5 * attempt)


def _fail_stale(study: Any) -> None:
    import optuna

    fail = getattr(optuna.storages, "fail_stale_trials", None)
    if fail is not None:
        fail(study)


def run_search(
    cfg: ReproduceConfig, model: str, grid_size: int | None, storage_url: str, log: Callable[[str], None] = print
) -> dict[str, Any] | None:
    """Run (or resume) the paper's search for one model; return the winning combination.

    Returns:
        ``{"combination", "lr", "weight_decay", "batch_size", "epochs", "val_accuracy",
        "trial"}`` for the best (combination, epoch count) by validation accuracy, the first one
        in the paper's order on ties; ``None`` with ``search_only`` while other workers still
        run trials.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with warnings.catch_warnings():
        # Heartbeats are marked experimental in Optuna; they have worked since 2.9.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return _run_search(cfg, model, grid_size, storage_url, log)


def _run_search(
    cfg: ReproduceConfig, model: str, grid_size: int | None, storage_url: str, log: Callable[[str], None]
) -> dict[str, Any] | None:
    import optuna
    from optuna.trial import TrialState

    combos = paper_combinations(cfg.trials)
    study = optuna.create_study(
        study_name=_study_name(cfg, model, grid_size),
        storage=_storage(storage_url, cfg.heartbeat),
        direction="maximize",
        load_if_exists=True,
    )
    for key, value in {
        "model": model,
        "grid_size": grid_size,
        "dataset": cfg.dataset,
        "max_epochs": cfg.epochs,
    }.items():
        study.set_user_attr(key, value)
    search_dir = Path(cfg.out) / _run_tag(model, grid_size) / "search"
    tag = f"{_run_tag(model, grid_size)} search"

    def objective(trial: optuna.Trial) -> float:
        index = trial.user_attrs.get("combination")
        if index is None:
            # Another worker took the queued trial we meant to run; Optuna then samples a new
            # one, which is not one of the paper's combinations.
            raise optuna.TrialPruned("not one of the paper's combinations")
        # Workers that start together may queue the same combination twice; the first to run it wins.
        others = study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.COMPLETE))
        if any(t.number != trial.number and t.user_attrs.get("combination") == index for t in others):
            raise optuna.TrialPruned("another worker runs this combination")
        combo = {key: trial.suggest_categorical(key, values) for key, values in PAPER_GRID.items()}
        run_dir = search_dir / _combo_tag(combo)
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        config = cfg.train_config(
            model, grid_size, epochs=cfg.epochs, val_fraction=PAPER_VAL_FRACTION, eval_test=False, **combo
        )
        log(f"{tag}: trial {index + 1}/{len(combos)} ({_combo_tag(combo)}) -> {run_dir}")
        try:
            results = train(config, run_dir, resume=True, log=lambda line: log(f"  {line}"))
        except RunFolderError as err:  # the same combination, started by another worker a moment ago
            raise optuna.TrialPruned(str(err)) from None
        except NonFiniteLossError as err:
            # The paper's loop would keep going with NaN weights and chance accuracy; the
            # epochs before the blow-up still count, as its argmax over epochs would see them.
            log(f"  {err}")
            results = load_results(run_dir)
            trial.set_user_attr("stopped", str(err))
        val = [entry["val_accuracy"] for entry in results["history"]]
        if not val:
            raise optuna.TrialPruned("the loss was not finite in the first epoch")
        best = int(np.argmax(val))
        trial.set_user_attr("best_epoch", best + 1)
        trial.set_user_attr("val_accuracy", val)
        log(f"{tag}: trial {index + 1}: best validation accuracy {100 * val[best]:.2f}% at epoch {best + 1}")
        return float(val[best])

    announced_wait = False
    while True:
        _fail_stale(study)
        trials = study.get_trials(deepcopy=False)
        states: dict[int, set[Any]] = {}
        for t in trials:
            if "combination" in t.user_attrs:
                states.setdefault(t.user_attrs["combination"], set()).add(t.state)
        active = {TrialState.COMPLETE, TrialState.WAITING, TrialState.RUNNING}
        for index, combo in enumerate(combos):
            if not states.get(index, set()) & active:
                study.enqueue_trial(combo, user_attrs={"combination": index})
                states.setdefault(index, set()).add(TrialState.WAITING)
        pending = {i for i in range(len(combos)) if TrialState.COMPLETE not in states.get(i, set())}
        if not pending:
            break
        if any(TrialState.WAITING in states.get(i, set()) for i in pending):
            study.optimize(objective, n_trials=1)
            continue
        if cfg.search_only:
            log(f"{tag}: {len(pending)} trials are running elsewhere")
            return None
        if not announced_wait:
            log(
                f"{tag}: waiting for {len(pending)} trials running elsewhere (an interrupted one is"
                f" queued again once its heartbeat is {GRACE_BEATS * cfg.heartbeat} s old)"
            )
            announced_wait = True
        time.sleep(cfg.heartbeat / 2)

    best: dict[str, Any] | None = None
    finished = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if t.user_attrs.get("combination", len(combos)) < len(combos)
    ]
    for t in sorted(finished, key=lambda t: (t.user_attrs["combination"], t.number)):
        if best is None or t.value > best["val_accuracy"]:
            best = {
                "combination": t.user_attrs["combination"],
                **{k: t.params[k] for k in PAPER_GRID},
                "epochs": t.user_attrs["best_epoch"],
                "val_accuracy": t.value,
                "trial": t.number,
            }
    return best


def _storage_url(cfg: ReproduceConfig) -> str:
    if cfg.storage:
        return cfg.storage
    return f"sqlite:///{(Path(cfg.out).resolve() / 'study.db').as_posix()}"


def reproduce(cfg: ReproduceConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the experiment for every model and grid size; write ``OUT/table.md`` and ``OUT/reproduce.json``.

    ``protocol="paper"``: the search of :func:`run_search` on the 80/20 split, then a run on the
    whole training set with the winning combination for the winning number of epochs, tested
    after every epoch. ``protocol="fixed"``: one run per model with :data:`FIXED_HPARAMS`.
    Calling it again resumes: finished trials and runs are not repeated.

    Returns:
        The content of ``reproduce.json``: per run tag the winner (paper protocol) and the
        folder of the final run.
    """
    if cfg.protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(map(repr, PROTOCOLS))}, got {cfg.protocol!r}")
    if cfg.table_only and cfg.protocol not in SEEDED_PROTOCOLS:
        raise ValueError(f"table_only applies to the paper-configs, beyond and bases protocols, not {cfg.protocol!r}")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.protocol == "paper-configs":
        return _reproduce_paper_configs(cfg, out, log)
    if cfg.protocol == "beyond":
        return _reproduce_beyond(cfg, out, log)
    if cfg.protocol == "bases":
        return _reproduce_bases(cfg, out, log)
    storage_url = _storage_url(cfg)
    summary: dict[str, Any] = {"protocol": cfg.protocol, "dataset": cfg.dataset, "runs": {}}
    if cfg.protocol == "paper":
        summary["storage"] = storage_url if cfg.storage is None else "(given with --storage)"
        summary["combinations"] = paper_combinations(cfg.trials)
    finals: list[Path] = []
    for model in cfg.models:
        grids: Sequence[int | None] = list(cfg.grid_sizes) if model_takes_grid_size(model) else [None]
        for grid_size in grids:
            tag = _run_tag(model, grid_size)
            entry: dict[str, Any] = {"model": model, "grid_size": grid_size}
            if cfg.protocol == "paper":
                winner = run_search(cfg, model, grid_size, storage_url, log)
                entry["winner"] = winner
                if winner is None:
                    summary["runs"][tag] = entry
                    continue
                log(
                    f"{tag}: best combination {_combo_tag(winner)} for {winner['epochs']} epochs"
                    f" (validation accuracy {100 * winner['val_accuracy']:.2f}%)"
                )
                if cfg.search_only:
                    summary["runs"][tag] = entry
                    continue
                config = cfg.train_config(
                    model,
                    grid_size,
                    epochs=winner["epochs"],
                    selected_epoch=winner["epochs"],
                    lr=winner["lr"],
                    weight_decay=winner["weight_decay"],
                    batch_size=winner["batch_size"],
                )
                # Named after the winner, so that a search that later picks another winner (more
                # trials, say) gets a fresh final run instead of clashing with the old one.
                final_dir = out / tag / "final" / f"{_combo_tag(winner)}_e{winner['epochs']}"
            else:
                config = cfg.train_config(model, grid_size, epochs=cfg.epochs, **FIXED_HPARAMS)
                final_dir = out / tag / "fixed"
            log(f"{tag}: final run -> {final_dir}")
            try:
                train(config, final_dir, resume=True, log=lambda line: log(f"  {line}"))
            except NonFiniteLossError as err:
                log(f"  {err}")
            entry["final_run"] = str(final_dir)
            summary["runs"][tag] = entry
            finals.append(final_dir)
    write_json(out / "reproduce.json", summary)
    if finals:
        table = reproduction_table(finals, cfg, summary["runs"])
        atomic_write(out / "table.md", lambda f: f.write(table), mode="w")
        log("")
        log(table)
    return summary


def _paper_config_rows(cfg: ReproduceConfig) -> list[tuple[str, int | None]]:
    rows = []
    for model in cfg.models:
        grids: Sequence[int | None] = list(cfg.grid_sizes) if model_takes_grid_size(model) else [None]
        for grid_size in grids:
            if (model, grid_size) not in PAPER_SELECTIONS:
                raise ValueError(f"the paper's logs hold no selected configuration for {_run_tag(model, grid_size)}")
            rows.append((model, grid_size))
    return rows


def _reproduce_paper_configs(cfg: ReproduceConfig, out: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """One final run per (row, seed) with the configuration the paper's search chose (its logs).

    Seed-major order (every row for the first seed, then the next seed), so that an interrupted
    study has complete tables for its first seeds; finished runs are skipped on a rerun.
    """
    rows = _paper_config_rows(cfg)
    options = {}
    for model, grid_size in rows:
        sel = PAPER_SELECTIONS[(model, grid_size)]
        options[(model, grid_size)] = {
            "epochs": sel.epochs, "lr": sel.lr, "weight_decay": sel.weight_decay, "batch_size": sel.batch_size
        }
    return _run_seeds(cfg, out, log, options, paper_configs_table)


def _reproduce_beyond(cfg: ReproduceConfig, out: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """One run per (model, seed) with :data:`BEYOND_RECIPE` for ``cfg.epochs`` epochs (horizontal
    flips on Fashion-MNIST only), seed-major; finished runs are skipped on a rerun."""
    recipe = {**BEYOND_RECIPE, "epochs": cfg.epochs, "hflip": cfg.dataset == "fashion-mnist"}
    summary = _run_seeds(cfg, out, log, {(model, None): recipe for model in cfg.models}, beyond_table)
    runs = [Path(d) for entry in summary["runs"].values() for d in entry["runs"]]
    zoo = sorted(Path(cfg.zoo).rglob("results.json")) if cfg.zoo else []
    plot_accuracy_vs_params(runs, out / "accuracy_vs_params.png", cfg.dataset, [f.parent for f in zoo])
    return summary


def _train_run(config: TrainConfig, run_dir: Path, log: Callable[[str], None]) -> None:
    """Train (or resume, or find finished) one run of a seeded protocol; a run that diverges is logged."""
    try:
        train(config, run_dir, resume=True, log=lambda line: log(f"  {line}"))
    except NonFiniteLossError as err:
        log(f"  {err}")


def _run_seeds(
    cfg: ReproduceConfig,
    out: Path,
    log: Callable[[str], None],
    options: dict[tuple[str, int | None], dict[str, Any]],
    make_table: Callable[[Sequence[Path], ReproduceConfig], str],
) -> dict[str, Any]:
    """Train every (model, grid size) with its ``options`` once per seed of ``cfg.seeds`` into
    ``OUT/<tag>/seed<S>``, seed-major (so that an interrupted study has complete tables for its
    first seeds); rewrite ``reproduce.json`` and ``table.md`` after every run."""
    summary: dict[str, Any] = {"protocol": cfg.protocol, "dataset": cfg.dataset, "seeds": list(cfg.seeds), "runs": {}}
    finals: list[Path] = []
    for seed in cfg.seeds:
        for (model, grid_size), opts in options.items():
            tag = _run_tag(model, grid_size)
            run_dir = out / tag / f"seed{seed}"
            config = cfg.train_config(model, grid_size, seed=seed, **opts)
            described = ", ".join(f"{key.replace('_', ' ')} {value:g}" if isinstance(value, float) else
                                  f"{key.replace('_', ' ')} {value}" for key, value in opts.items())
            if not cfg.table_only:
                log(f"{tag} seed {seed}: {described} -> {run_dir}")
                _train_run(config, run_dir, log)
            summary["runs"].setdefault(tag, {"model": model, "grid_size": grid_size, "runs": []})["runs"].append(
                str(run_dir))
            finals.append(run_dir)
            write_json(out / "reproduce.json", summary)
            table = make_table(finals, cfg)
            atomic_write(out / "table.md", lambda f: f.write(table), mode="w")
    log("")
    log(make_table(finals, cfg))
    return summary


BASES_MODEL = "kanc_mlp_medium"


def _reproduce_bases(cfg: ReproduceConfig, out: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """KANC MLP (Medium) with each basis family at the B-spline model's size (``MATCHED_BASES``),
    one fixed recipe, once per seed: ``OUT/FAMILY/seedS/``, ``OUT/table.md``, ``OUT/bases.png``.

    Seed-major order, so that an interrupted study has complete tables for its first seeds;
    finished runs are skipped and unfinished ones resume on a rerun.
    """
    from .models import MATCHED_BASES

    families = list(cfg.bases) if cfg.bases else list(MATCHED_BASES)
    unknown = [f for f in families if f not in MATCHED_BASES]
    if unknown:
        raise ValueError(f"unknown basis families {unknown}; expected some of {list(MATCHED_BASES)}")
    summary: dict[str, Any] = {"protocol": cfg.protocol, "dataset": cfg.dataset, "model": BASES_MODEL,
                               "seeds": list(cfg.seeds), "epochs": cfg.epochs, **FIXED_HPARAMS, "runs": {}}
    finals: list[Path] = []
    for seed in cfg.seeds:
        for family in families:
            options = MATCHED_BASES[family]
            if set(options) - {"basis", "grid_size", "degree"}:
                raise ValueError(f"the study sets grid_size, basis and degree only, got {options}")
            run_dir = out / family / f"seed{seed}"
            config = cfg.train_config(BASES_MODEL, options.get("grid_size", 10), seed=seed, epochs=cfg.epochs,
                                      basis=options.get("basis", "bspline"), degree=options.get("degree"),
                                      **FIXED_HPARAMS)
            if not cfg.table_only:
                log(f"{family} seed {seed} -> {run_dir}")
                _train_run(config, run_dir, log)
            summary["runs"].setdefault(family, []).append(str(run_dir))
            finals.append(run_dir)
            write_json(out / "reproduce.json", summary)
            table = bases_table(finals, cfg)
            atomic_write(out / "table.md", lambda f: f.write(table), mode="w")
    _plot_bases(finals, out / "bases.png", cfg)
    log("")
    log(bases_table(finals, cfg))
    return summary


def _bases_rows(run_dirs: Sequence[Path]) -> dict[str, dict[str, list[float]]]:
    """Per family: the last-epoch test accuracy and F1 (%), parameters and minutes per epoch of its runs."""
    rows: dict[str, dict[str, list[float]]] = {}
    for d in run_dirs:
        if not (Path(d) / "results.json").is_file():
            continue
        res = load_results(d)
        if res.get("status") != FINISHED or not res.get("test_last"):  # only finished runs enter the means
            continue
        row = rows.setdefault(res["config"].get("basis", "bspline"), {"acc": [], "f1": [], "params": [], "min": []})
        row["acc"].append(100 * res["test_last"]["accuracy"])
        row["f1"].append(100 * res["test_last"]["f1"])
        row["params"].append(res["params"])
        row["min"].append(res["minutes_per_epoch"])
    return rows


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def bases_table(run_dirs: Sequence[Path], cfg: ReproduceConfig) -> str:
    """Markdown for the "bases" protocol: one row per family, mean ± sample std over the seeds."""
    lines = [
        f"# {cfg.dataset}: KANC MLP (Medium) per basis family",
        "",
        "Every family at the B-spline model's parameter count (G = 10, K = 3; within 10%), AdamW lr"
        f" {FIXED_HPARAMS['lr']:g}, weight decay {FIXED_HPARAMS['weight_decay']:g}, batch"
        f" {FIXED_HPARAMS['batch_size']}, {cfg.epochs} epochs, no schedule, torch seeds"
        f" {', '.join(str(s) for s in cfg.seeds)}. Last-epoch test metrics; mean ± sample std over the"
        " finished seeds (n).",
        "",
        "| basis | params | test accuracy (%) | test F1 (%) | min / epoch | n |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    if cfg.max_train_samples or cfg.max_test_samples:
        lines[2] += (f" Subsampled: {cfg.max_train_samples or 'all'} training / {cfg.max_test_samples or 'all'}"
                     " test images.")
    for family, row in _bases_rows(run_dirs).items():
        acc, f1, mins = _mean_std(row["acc"]), _mean_std(row["f1"]), _mean_std(row["min"])
        lines.append(f"| {family} | {int(row['params'][0]):,} | {acc[0]:.2f} ± {acc[1]:.2f} | {f1[0]:.2f} ± {f1[1]:.2f}"
                     f" | {mins[0]:.3f} | {len(row['acc'])} |")
    return "\n".join(lines) + "\n"


def _plot_bases(run_dirs: Sequence[Path], path: Path, cfg: ReproduceConfig) -> None:
    """Last-epoch test accuracy per family, mean with sample-std error bars."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:  # matplotlib is optional
        return
    rows = _bases_rows(run_dirs)
    if not rows:
        return
    stats = [_mean_std(r["acc"]) for r in rows.values()]
    fig = Figure(figsize=(7, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.errorbar(range(len(rows)), [m for m, _ in stats], yerr=[s for _, s in stats], fmt="o", capsize=4)
    ax.set_xticks(range(len(rows)), list(rows), rotation=30)
    ax.set_ylabel("last-epoch test accuracy (%)")
    ax.set_title(f"KANC MLP (Medium) per basis family, {cfg.dataset}, seeds {', '.join(map(str, cfg.seeds))}")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))


def paper_configs_table(run_dirs: Sequence[Path], cfg: ReproduceConfig) -> str:
    """Markdown for the "paper-configs" protocol: mean +- std over seeds, two selections."""
    files = [Path(d) / "results.json" for d in run_dirs if (Path(d) / "results.json").is_file()]
    parts = [
        f"# {cfg.dataset}: the paper's selected configurations, several seeds",
        "",
        "Per row: the learning rate, weight decay, batch size and epoch count that the paper's own search"
        " chose (its logs), trained on all 60k training images with AdamW and no schedule,"
        f" tested after every epoch, torch seeds {', '.join(str(s) for s in cfg.seeds)}. Mean ± sample std over"
        " the seeds (n = number of finished seeds); Δ is the mean accuracy minus the paper's, rows more than"
        " 0.5 points away marked *. Epoch: the selected epoch of each seed.",
        "",
    ]
    return _seed_sections(parts, files, (("paper", "Best test epoch (the paper's selection: optimistic)"),
                                         ("last", "Last epoch (no selection)")))


def beyond_table(run_dirs: Sequence[Path], cfg: ReproduceConfig) -> str:
    """Markdown for the "beyond" protocol: mean +- std over seeds, validation-selected and last epoch."""
    files = [Path(d) / "results.json" for d in run_dirs if (Path(d) / "results.json").is_file()]
    recipe = ", ".join(f"{key} {value}" for key, value in BEYOND_RECIPE.items())
    flip = "horizontal flips" if cfg.dataset == "fashion-mnist" else "no flips (digits)"
    parts = [
        f"# {cfg.dataset}: small KAN-convolution nets and matched CNNs, one modern recipe",
        "",
        f"Recipe, identical for every model: AdamW, {recipe}, {flip}, {cfg.epochs} epochs; torch seeds"
        f" {', '.join(str(s) for s in cfg.seeds)}. Mean ± sample std over the seeds (n = number of finished"
        " seeds). Epoch: the reported epoch of each seed. Minutes per epoch: one training epoch plus one"
        " pass over the test set, on this machine.",
        "",
    ]
    return _seed_sections(parts, files, (("val", "Validation-selected epoch (best validation accuracy)"),
                                         ("last", "Last epoch (no selection)")))


def plot_accuracy_vs_params(
    run_dirs: Sequence[Path], path: Path, dataset: str, zoo_dirs: Sequence[Path] = ()
) -> dict[str, tuple[int, list[float]]] | None:
    """Test accuracy against parameter count: the finished runs of ``run_dirs`` (mean ± sample std
    over seeds at the validation-selected epoch, else the last), beside the paper's published table
    (Fashion-MNIST only) and, from ``zoo_dirs``, our runs of the paper's zoo (mean over seeds at the
    best test epoch, the paper's selection).

    Returns:
        The points of ``run_dirs`` (per model name: parameters, accuracies in percent), or ``None``
        when no figure was written (nothing finished, or matplotlib missing: it is optional).
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None

    def grouped(dirs: Sequence[Path], selections: Sequence[str]) -> dict[str, tuple[int, list[float]]]:
        files = [Path(d) / "results.json" for d in dirs if (Path(d) / "results.json").is_file()]
        groups: dict[str, tuple[int, list[float]]] = {}
        for selection in selections:
            rows, _ = rows_from_results(files, selection)  # type: ignore[arg-type]
            for row in rows:
                if row.status != FINISHED or row.dataset != dataset:
                    continue
                groups.setdefault(row.name, (row.params, []))[1].append(100 * row.accuracy)
            if groups:
                return groups
        return groups

    ours = grouped(run_dirs, ("val", "last"))
    if not ours:
        return None
    fig = Figure(figsize=(7.5, 5.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if dataset == "fashion-mnist":
        ax.scatter([r.params for r in PAPER_RESULTS], [r.accuracy for r in PAPER_RESULTS], marker="x",
                   color="0.5", label="the paper's table (one seed, best test epoch)")
    zoo = grouped(zoo_dirs, ("paper",)) if zoo_dirs else {}
    if zoo:
        ax.scatter([p for p, _ in zoo.values()], [float(np.mean(a)) for _, a in zoo.values()], marker="+",
                   color="black", label="the paper's zoo here (mean of seeds, best test epoch)")
    for index, (name, (params, accs)) in enumerate(sorted(ours.items())):
        mean, std = _mean_std(accs)
        ax.errorbar([params], [mean], yerr=[std], fmt="o", capsize=4, color=f"C{index}",
                    label=f"{name} (n = {len(accs)}, validation-selected)")
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{dataset}: accuracy against parameters")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)  # below: keeps points clear
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    return ours


def _seed_sections(parts: list[str], files: Sequence[Path], selections: Sequence[tuple[str, str]]) -> str:
    """``parts`` (a title and an intro) followed by one mean ± std table per ``(selection, title)``."""
    for selection, title in selections:
        parts += [f"## {title}", "", seed_table(files, selection)]  # type: ignore[arg-type]
    return "\n".join(parts)


def search_table(out: Path, runs: dict[str, dict[str, Any]], cfg: ReproduceConfig) -> str:
    """Markdown: per searched row, the best validation accuracy (and its epoch) of every combination,
    the winner, and what the paper's logs say its search chose."""
    combos = paper_combinations(cfg.trials)
    header = ["Model", *(f"{i + 1}: {_combo_tag(c)}" for i, c in enumerate(combos)), "our winner",
              "the paper's winner (its logs)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    for tag, entry in runs.items():
        winner = entry.get("winner")
        if not winner:
            continue
        cells = [tag]
        for combo in combos:
            run_dir = out / tag / "search" / _combo_tag(combo)
            val = []
            if (run_dir / "results.json").is_file():
                val = [h["val_accuracy"] for h in load_results(run_dir)["history"] if "val_accuracy" in h]
            best = int(np.argmax(val)) if val else None
            cells.append("–" if best is None else f"{100 * val[best]:.2f}% (e{best + 1})")
        cells.append(f"{_combo_tag(winner)}, {winner['epochs']} epochs: {100 * winner['val_accuracy']:.2f}%")
        sel = PAPER_SELECTIONS.get((entry["model"], entry["grid_size"]))
        cells.append("–" if sel is None else
                     f"{_combo_tag(vars(sel))}, {sel.epochs} epochs: {sel.val_accuracy:.2f}%")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def reproduction_table(
    run_dirs: Sequence[Path], cfg: ReproduceConfig, runs: dict[str, dict[str, Any]] | None = None
) -> str:
    """Markdown: our numbers beside the paper's, once per epoch selection, with how each was made;
    with the paper protocol's ``runs`` (the summary's per-row winners), the search as well."""
    files = [Path(d) / "results.json" for d in run_dirs if (Path(d) / "results.json").is_file()]
    if cfg.protocol == "paper":
        intro = (
            f"Protocol: the paper's. Per model, {cfg.trials} of the paper's random combinations"
            f" (NumPy seed {PAPER_SEED}) of lr x weight decay x batch size, each trained up to"
            f" {cfg.epochs} epochs on an 80/20 split of the training set (split seed 0) and scored"
            " by validation accuracy per epoch; the best (combination, epoch count) is retrained on"
            " the whole training set (torch seed 0) and tested after every epoch."
        )
        second = (
            "val",
            "Epoch count chosen on the validation split (clean)",
            "the last epoch of the final run, whose length the search chose without seeing the test set",
        )
    else:
        intro = (
            f"Protocol: fixed hyperparameters (lr {FIXED_HPARAMS['lr']:g}, weight decay"
            f" {FIXED_HPARAMS['weight_decay']:g}, batch size {FIXED_HPARAMS['batch_size']}),"
            f" {cfg.epochs} epochs on the whole training set, tested after every epoch; no search."
        )
        second = ("last", "Last epoch (no selection)", "the last epoch")
    if cfg.max_train_samples or cfg.max_test_samples:
        intro += (
            f" Subsampled: {cfg.max_train_samples or 'all'} training / {cfg.max_test_samples or 'all'} test images."
        )
    parts = [f"# {cfg.dataset}: our runs beside the paper's table", "", intro, ""]
    sections = [
        (
            "paper",
            "Best test epoch (the paper's selection)",
            "the epoch with the best test accuracy: it selects on the test set, so it is optimistic",
        ),
        second,
    ]
    for selection, title, how in sections:
        rows, _ = rows_from_results(files, selection)  # type: ignore[arg-type]
        parts += [
            f"## {title}",
            "",
            f"Each row reports {how}. Minutes per epoch: measured on this machine at the run's batch size;"
            " the paper's were on a GPU.",
            "",
        ]
        parts.append(markdown_table(rows, compare_paper=cfg.dataset == "fashion-mnist"))
    if cfg.protocol == "paper" and runs:
        parts += [
            "## The search",
            "",
            "Per combination (in the paper's order): the best accuracy on the 20% validation split and the"
            " epoch that reached it; the winner is the best (combination, epoch count), the first in this"
            " order on ties. Beside it, what the paper's own search chose (its logs).",
            "",
            search_table(Path(cfg.out), runs, cfg),
        ]
    return "\n".join(parts)
