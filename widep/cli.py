"""The ``widep`` command line.

Each subcommand lives beside the code it drives and is imported only when it is invoked, so
``widep plan`` does not pay for matplotlib, aiohttp or Ray. A :class:`~widep.errors.UserError`
becomes one clear message and exit code 2 (or the error's own code); ``--debug`` shows the traceback.
"""

from __future__ import annotations

import importlib
import sys

import click

from widep.errors import UserError

# name -> "module:attribute" of a click command; imported lazily.
COMMANDS: dict[str, str] = {
    "plan": "widep.plan.cli:plan_cmd",
    "render": "widep.render.cli:render_cmd",
    "launch": "widep.run.cli:launch_cmd",
    "status": "widep.run.cli:status_cmd",
    "lws": "widep.k8s.cli:lws_cmd",
    "sweep": "widep.perf.cli:sweep_cmd",
    "predict": "widep.perf.cli:predict_cmd",
    "calibrate": "widep.perf.cli:calibrate_cmd",
    "bench": "widep.bench.cli:bench_cmd",
    "doctor": "widep.doctor.cli:doctor_cmd",
    "profile": "widep.profile.cli:profile_cmd",
    "model": "widep.model_cli:model_cmd",
    "experts": "widep.experts.cli:experts_cmd",
}

HELP: dict[str, str] = {
    "plan": "Rank layout, expert placement and per-GPU memory of a topology.",
    "render": "The exact argv and environment of every vLLM rank (dry run).",
    "launch": "Start and supervise this node's vLLM ranks (or all of them via Ray).",
    "status": "Which ranks of a topology answer /health, from any machine.",
    "lws": "LeaderWorkerSet manifests for Kubernetes; --validate checks any LWS file.",
    "sweep": "Enumerate and predict topologies (or measure them); Pareto frontier.",
    "predict": "One deployment at one concurrency: throughput, latency, step breakdown, overlap, band.",
    "calibrate": "Fit the performance model's free terms to measured widep bench runs; residuals per point.",
    "bench": "Concurrency sweeps against live endpoints; llm-d reports; plots.",
    "doctor": "Node preflight: GPUs, vLLM and kernels, RDMA, /dev/shm, memlock, ports.",
    "profile": "Capture vLLM's torch profiler on chosen ranks of a running deployment.",
    "model": "Build the tiny random-weight MoE used by the CPU demo and the tests.",
    "experts": "Expert load per layer and EP rank (recorded or hand-made); EPLB advice; recording.",
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name in COMMANDS if _available(name)]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None or not _available(cmd_name):
            return None
        module_name, attr = target.split(":")
        return getattr(importlib.import_module(module_name), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, HELP.get(name, "")) for name in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


def _available(name: str) -> bool:
    """True when the subcommand's module exists in this installation."""
    import importlib.util

    try:
        return importlib.util.find_spec(COMMANDS[name].split(":")[0]) is not None
    except ModuleNotFoundError:
        return False


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks for user errors.")
@click.version_option(package_name="widep")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """widep: plan, launch and benchmark wide expert-parallel vLLM deployments."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def main(argv: list[str] | None = None) -> int:
    """Console entry point: runs the CLI and turns UserError into a message and an exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        rv = cli.main(args=args, prog_name="widep", standalone_mode=False)
    except UserError as err:
        if debug:
            raise
        click.echo(f"error: {err}", err=True)
        return err.exit_code
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as err:
        err.show()
        return err.exit_code
    except click.exceptions.Exit as err:
        return err.exit_code
    except UnicodeEncodeError as err:
        if debug or err.reason != "surrogates not allowed":
            raise
        click.echo(
            "error: a file name or argument is not valid UTF-8; rename the file (or fix the argument).", err=True
        )
        return 2
    except OSError as err:
        # A path the system refuses (a name over 255 bytes, a folder given as a file, no permission): the
        # person's input, not a widep bug. Output that cannot be written (stdout on a full disk, a closed pipe):
        # an I/O failure, exit 1. Other exceptions keep their traceback.
        if debug:
            raise
        if err.filename is None:
            click.echo(f"error: cannot write the output: {err.strerror or err}.", err=True)
            return 1
        name = str(err.filename)
        shown = name if len(name) <= 120 else name[:120] + "..."
        click.echo(f"error: {shown!r}: {err.strerror or err}.", err=True)
        return 2
    return rv if isinstance(rv, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
