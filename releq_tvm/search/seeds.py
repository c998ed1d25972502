"""One search per seed: the same :class:`SearchConfig` run with seeds 0..N-1, ``jobs`` at a time.

Each seed's run goes to ``root/seed<N>`` and is an ordinary search run (``releq-tvm search
--run-dir root/seed<N> --resume`` continues it by hand). A run folder that already holds a run
is resumed, not replaced, so an interrupted ``search-seeds`` picks up where it stopped and a
finished one only reads its runs back. With ``jobs`` > 1 the runs go to separate processes
(spawned, one torch thread each by default); each writes its progress lines to
``root/seed<N>/search.log``. The accuracy cache is the shared store, so a configuration one
seed has fine-tuned is a cache hit for the others (counted as such in each run's best.json).
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import replace
from pathlib import Path

from releq_tvm.bits import format_bits
from releq_tvm.search.config import SearchConfig

#: Each run's progress lines, inside its run folder.
LOG_NAME = "search.log"


def seed_run_dir(root: str | Path, seed: int) -> Path:
    return Path(root) / f"seed{seed}"


def _run_one(config: SearchConfig, resume: bool) -> dict:
    """One search (in a worker process): its progress lines go to the run's log file."""
    from releq_tvm.search.run import run_search

    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / LOG_NAME, "a", encoding="utf-8") as log:
        def echo(line: str) -> None:
            log.write(line + "\n")
            log.flush()

        return run_search(config, resume=resume, echo=echo)


def run_seeds(config: SearchConfig, seeds: Sequence[int], root: str | Path, jobs: int = 1,
              echo: Callable[[str], None] = print) -> dict[int, dict]:
    """Run (or resume) one search per seed under ``root``; returns each seed's best.json content.

    ``config.seed`` and ``config.run_dir`` are replaced per seed; everything else is shared.
    """
    configs = {seed: replace(config, seed=int(seed), run_dir=str(seed_run_dir(root, seed))) for seed in seeds}
    resume = {seed: (Path(c.run_dir) / "config.json").is_file() for seed, c in configs.items()}
    for seed, c in configs.items():
        echo(f"seed {seed}: {'resume' if resume[seed] else 'start'} {c.run_dir} (progress in {c.run_dir}/{LOG_NAME})")
    results: dict[int, dict] = {}
    if jobs <= 1:
        for seed, c in configs.items():
            results[seed] = _run_one(c, resume[seed])
            echo(_finished_line(seed, results[seed]))
        return results
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_run_one, c, resume[seed]): seed for seed, c in configs.items()}
        for future in as_completed(futures):
            seed = futures[future]
            results[seed] = future.result()
            echo(_finished_line(seed, results[seed]))
    return dict(sorted(results.items()))


def _finished_line(seed: int, best: dict) -> str:
    solution = best.get("solution") or {}
    converged = best.get("converged_episode")
    bits = format_bits(solution.get("w_bits") or [])
    if solution.get("a_bits"):
        bits += " a " + format_bits(solution["a_bits"])
    when = f"converged at episode {converged}" if converged else f"not converged in {best.get('training_episodes')} episodes"
    return f"seed {seed}: {when}; chosen {bits}; {best.get('elapsed_seconds', 0) / 60:.1f} min"


#: Store namespace of long fine-tunes done for a front (``<oracle settings key>`` appended).
LONG_NAMESPACE = "long_finetune"


def long_finetune_configurations(config: SearchConfig, configurations: Sequence[tuple[Sequence[int], Sequence[int] | None]],
                                 echo: Callable[[str], None] = print) -> dict[tuple, dict]:
    """The long fine-tune (:func:`releq_tvm.search.accuracy.long_finetune`, ``config``'s steps, rates
    and seed) of each configuration, with its test accuracy; results are kept in the cache store,
    so each configuration is fine-tuned once per settings. Returns {(w_bits, a_bits): result}.

    The model and the images are the search's own (:func:`releq_tvm.search.run.build_parts`): a
    ``--model`` is registered again, and the test split comes from ``--data`` or the network's dataset.
    """
    import json

    from releq_tvm.errors import ReleqError
    from releq_tvm.search.accuracy import long_finetune
    from releq_tvm.search.run import build_parts

    # long_finetune=True: build_parts reads the test split only for a search that long fine-tunes
    parts = build_parts(replace(config, run_dir=None, long_finetune=True))
    oracle = parts.oracle
    store = oracle.cache.store
    settings = {"steps": config.long_steps, "learning_rates": list(config.long_lrs), "seed": config.seed,
                "batch_size": config.finetune_batch_size}
    namespace = f"{LONG_NAMESPACE}/{oracle.key}/{oracle.cache.settings_key(settings)}"
    out: dict[tuple, dict] = {}
    for i, (w, a) in enumerate(configurations):
        key = (tuple(int(b) for b in w), None if a is None else tuple(int(b) for b in a))
        entry_key = json.dumps([list(key[0]), None if key[1] is None else list(key[1])])
        result = store.get(namespace, entry_key)
        if result is None:
            if parts.data.test is None:
                raise ReleqError(f"--long-front reports test accuracy, but the runs' data ({parts.data.source}) has no "
                                 "test split: add one (x_test, y_test in an npz; test/ in an image folder)")
            echo(f"long fine-tune {i + 1}/{len(configurations)}: w {format_bits(key[0])}"
                 + (f" a {format_bits(key[1])}" if key[1] else "") + f" ({config.long_steps} steps per rate)")
            result, _ = long_finetune(oracle, key[0], key[1], parts.data.test, steps=config.long_steps,
                                      learning_rates=config.long_lrs, batch_size=config.finetune_batch_size,
                                      seed=config.seed)
            store.put(namespace, entry_key, result)
        out[key] = result
    return out
