"""`releq-tvm search NET`: the ReLeQ bitwidth search (and `search-efficiency`, its comparison to baselines)."""

from __future__ import annotations

import click

from releq_tvm.cli_options import checkpoint_option, data_dir_option, network_argument
from releq_tvm.config import DEFAULTS
from releq_tvm.search.config import SearchConfig
from releq_tvm.search.cost import CPU_KERNELS

_DEFAULT = SearchConfig(network="")


def _action_set(ctx, param, value):
    from releq_tvm.bits import parse_action_set

    return None if value is None else parse_action_set(value)


@click.command("search")
@network_argument
@click.option("--measure", type=click.Choice(["none", "cpu", "stripes"]), default=_DEFAULT.measure, show_default=True,
              help="Cost in state and reward: SQ formula, measured TVM CPU latency ratio, or Stripes simulator ratio.")
@click.option("--metric", type=click.Choice(["cycles", "energy"]), default=_DEFAULT.metric, show_default=True,
              help="Stripes ratio: cycles (1/speedup) or energy.")
@click.option("--cpu-kernels", type=click.Choice(CPU_KERNELS), default=_DEFAULT.cpu_kernels, show_default=True,
              help="--measure cpu prices the auto build (per layer the faster of bit-serial and int8, over int8) "
                   "or pure bit-serial over bit-serial at 8 bits.")
@click.option("--reward", type=click.Choice(["asymmetric", "sa_over_sq", "sa_minus_sq", "hardware"]),
              default=_DEFAULT.reward, show_default=True, help="hardware: METHOD.md section 4 (with --acc-limit).")
@click.option("--acc-limit", type=float, default=None, help="Accuracy limit in percent for --reward hardware.")
@click.option("--reward-a", type=float, default=_DEFAULT.reward_a, show_default=True, help="Asymmetric reward: cost exponent a.")
@click.option("--reward-b", type=float, default=_DEFAULT.reward_b, show_default=True, help="Asymmetric reward: accuracy exponent b.")
@click.option("--reward-th", type=float, default=_DEFAULT.reward_th, show_default=True,
              help="Asymmetric reward: SA below th scores -1.")
@click.option("--max-loss", type=click.FloatRange(0), default=_DEFAULT.max_loss, show_default=True,
              help="Val accuracy (pp, after the short fine-tune) the asymmetric reward lets go; it raises th to "
                   "1 - max_loss/full precision. 100 leaves METHOD.md's th alone.")
@click.option("--sq-form", type=click.Choice(["cost", "plain"]), default=_DEFAULT.sq_form, show_default=True,
              help="State of Quantization for --measure none: energy-weighted or sum(bits)/(8L).")
@click.option("--action-set", "action_set", default=None, callback=_action_set,
              help="Weight bitwidths the agent picks from, e.g. 1-8 or 2,4,8.  [default: 1-8]")
@click.option("--search-activations", is_flag=True, help="Hardware-aware mode: search activation bits too.")
@click.option("--act-action-set", default=None, callback=_action_set,
              help="Activation bitwidths with --search-activations.  [default: 2,4,8]")
@click.option("--latency-target", type=float, default=None,
              help="Cost ratio to 8 bits each episode's bits are corrected to (reverse layer order).")
@click.option("--no-weight-std", is_flag=True, help="Leave the weight std out of the state (ablation).")
@click.option("--accuracy", type=click.Choice(["finetune", "none"]), default=_DEFAULT.accuracy, show_default=True,
              help="none: score cost only (SA = 1), for networks whose data is not here.")
@click.option("--finetune", "finetune_mode", type=click.Choice(["per-episode", "per-step"]), default=_DEFAULT.finetune,
              show_default=True, help="Short fine-tune once per episode (final bits) or after every action.")
@click.option("--short-steps", type=click.IntRange(0), default=_DEFAULT.short_steps, show_default=True)
@click.option("--long-steps", type=click.IntRange(0), default=_DEFAULT.long_steps, show_default=True,
              help="Fine-tune steps of the chosen bits after the search (0: skip).")
@click.option("--val-images", type=click.IntRange(1), default=_DEFAULT.val_images, show_default=True,
              help="Val images the reward's accuracy is measured on.")
@click.option("--episodes", type=click.IntRange(1), default=None,
              help=f"Training episodes (the search stops earlier once converged).  [default: {_DEFAULT.episodes}]")
@click.option("--final-episodes", type=click.IntRange(1), default=_DEFAULT.final_episodes, show_default=True,
              help="Deterministic episodes that read off the solution.")
@click.option("--no-early-stop", is_flag=True, help="Spend the whole episode budget even after convergence.")
@click.option("--clip-range", type=click.FloatRange(0, 1, min_open=True), default=_DEFAULT.ppo_clip_range, show_default=True,
              help="PPO clip range (METHOD.md: 0.1; the clip ablation uses 0.2 and 0.3).")
@click.option("--seed", type=int, default=DEFAULTS.ppo.seed, show_default=True)
@click.option("--threads", type=click.IntRange(1), default=_DEFAULT.threads, show_default=True, help="torch threads.")
@click.option("--cache", "cache_path", type=click.Path(dir_okay=False), default=None,
              help="Accuracy cache store file (default: <cache dir>/cache.sqlite, shared by all runs).")
@click.option("--run-dir", type=click.Path(file_okay=False), default=None,
              help="Where the run's files go (default runs/search/<net>-<measure>-<reward>).")
@click.option("--resume", is_flag=True, help="Continue the run in --run-dir from its last checkpoint.")
@click.option("--overwrite", is_flag=True, help="Replace a run already in --run-dir.")
@checkpoint_option
@data_dir_option
def search_cmd(network, measure, metric, cpu_kernels, reward, acc_limit, reward_a, reward_b, reward_th, max_loss, sq_form, action_set, search_activations, act_action_set,
               latency_target, no_weight_std, accuracy, finetune_mode, short_steps, long_steps, val_images, episodes, final_episodes,
               no_early_stop, clip_range, seed, threads, cache_path, run_dir, resume, overwrite, checkpoint, data_dir) -> None:
    """Search per-layer bitwidths of NET with ReLeQ (RecurrentPPO); files go to --run-dir.

    Writes config.json, episodes.csv, action_probs.csv, best.json (with the long fine-tune's
    test accuracy of the chosen bits) and checkpoint.pt (for --resume).
    """
    from releq_tvm.networks import get_network_spec
    from releq_tvm.search.run import run_search

    get_network_spec(network)  # an unknown name fails here, in one line
    if acc_limit is not None and reward != "hardware":
        click.echo("note: --acc-limit only changes --reward hardware", err=True)
    config = SearchConfig(
        network=network,
        measure=measure,
        metric=metric,
        cpu_kernels=cpu_kernels,
        reward=reward,
        acc_limit=acc_limit,
        reward_a=reward_a,
        reward_b=reward_b,
        reward_th=reward_th,
        max_loss=max_loss,
        sq_form=sq_form,
        action_set=action_set or _DEFAULT.action_set,
        search_activations=search_activations,
        act_action_set=act_action_set or _DEFAULT.act_action_set,
        latency_target=latency_target,
        weight_std_in_state=not no_weight_std,
        accuracy=accuracy,
        finetune=finetune_mode,
        short_steps=short_steps,
        long_steps=long_steps,
        long_finetune=long_steps > 0,
        val_images=val_images,
        episodes=episodes or _DEFAULT.episodes,
        final_episodes=final_episodes,
        stop_on_convergence=not no_early_stop,
        ppo_clip_range=clip_range,
        seed=seed,
        threads=threads,
        cache_path=cache_path,
        run_dir=run_dir,
        checkpoint=checkpoint,
        data_dir=data_dir,
    )
    if resume:
        ctx = click.get_current_context()
        ignored = [
            p.name for p in ctx.command.params
            if p.name not in ("network", "run_dir", "resume", "episodes")
            and ctx.get_parameter_source(p.name) == click.core.ParameterSource.COMMANDLINE
        ]
        if ignored:
            click.echo(f"note: --resume uses the run's saved settings; ignoring {', '.join(ignored)}", err=True)
    run_search(config, resume=resume, overwrite=overwrite, echo=click.echo, resume_episodes=episodes if resume else None)


@click.command("search-efficiency")
@network_argument
@click.option("--budget", type=click.IntRange(1), default=None,
              help="Distinct configurations each method may evaluate (default: |exhaustive set|^L).")
@click.option("--methods", default="ppo,random,exhaustive", show_default=True)
@click.option("--exhaustive-set", default="2,4,8", show_default=True, callback=_action_set,
              help="The smaller bit set exhaustive enumeration covers.")
@click.option("--measure", type=click.Choice(["none", "cpu", "stripes"]), default="none", show_default=True)
@click.option("--cpu-kernels", type=click.Choice(CPU_KERNELS), default=_DEFAULT.cpu_kernels, show_default=True,
              help="What --measure cpu prices (as for search).")
@click.option("--reward", type=click.Choice(["asymmetric", "sa_over_sq", "sa_minus_sq"]), default="asymmetric", show_default=True)
@click.option("--accuracy", type=click.Choice(["finetune", "none"]), default="finetune", show_default=True)
@click.option("--short-steps", type=click.IntRange(0), default=_DEFAULT.short_steps, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=click.IntRange(1), default=_DEFAULT.threads, show_default=True, help="torch threads.")
@click.option("-o", "--out", type=click.Path(dir_okay=False), default="results/search_efficiency.csv", show_default=True)
@checkpoint_option
@data_dir_option
def search_efficiency_cmd(network, budget, methods, exhaustive_set, measure, cpu_kernels, reward, accuracy, short_steps, seed,
                          threads, out, checkpoint, data_dir) -> None:
    """Compare PPO, random search and exhaustive enumeration on NET at the same configuration budget."""
    import sys

    from releq_tvm.report.search_efficiency import efficiency_png, write_efficiency_csv
    from releq_tvm.search.efficiency import compare_search_methods

    config = SearchConfig(network=network, measure=measure, cpu_kernels=cpu_kernels, reward=reward, accuracy=accuracy,
                          short_steps=short_steps, seed=seed, threads=threads,
                          checkpoint=checkpoint, data_dir=data_dir)
    names = [m.strip() for m in methods.split(",") if m.strip()]
    rows = compare_search_methods(network, budget=budget, methods=names, exhaustive_set=exhaustive_set,
                                  config=config, echo=click.echo)
    from pathlib import Path

    from releq_tvm.io import atomic_write_bytes

    write_efficiency_csv(rows, out, " ".join(["releq-tvm"] + sys.argv[1:]), config)
    png = Path(out).with_suffix(".png")
    atomic_write_bytes(png, efficiency_png(rows))
    click.echo(f"wrote {out} and {png}")
    winner = [r["method"] for r in rows if r["winner"]]
    click.echo(f"best accuracy/cost point (highest reward): {', '.join(winner)} -> {out}")
