"""Command line: ``ptcl run | list | compare``.

    ptcl run [CONFIG] [key=value ...] [--out DIR] [--resume RUN_DIR] [-q]
    ptcl run --pilot-config PILOT.json [key=value ...]     (a LAMDA-PILOT exps/*.json file)
    ptcl import-pilot PILOT.json [key=value ...] [-o OUT.yaml]
    ptcl list methods|backbones|datasets [-v]
    ptcl show METHOD
    ptcl compare RUN_DIR [RUN_DIR ...] [--plot FILE]

User errors print one line (``ptcl: error: ...``) and exit with status 2; Ctrl-C prints
what was kept and exits with 130.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from ptcl.errors import PtclError, one_line

log = logging.getLogger("ptcl")


def _console_only(record: logging.LogRecord) -> bool:
    """Records marked ``file_only`` (the results table) go to run.log, not the console."""
    return not getattr(record, "file_only", False)


class _Stderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the record (not at set-up)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _launch_rank() -> int:
    """This process's rank as torchrun set it (``RANK``; 0 otherwise), read without
    importing torch (:func:`ptcl.dist.launch_rank`)."""
    try:
        return int(os.environ.get("RANK", "0") or 0)
    except ValueError:
        return 0


def _setup_logging(quiet: bool) -> None:
    h = _Stderr()
    h.setFormatter(logging.Formatter("%(message)s"))
    h.addFilter(_console_only)
    root = logging.getLogger("ptcl")
    root.handlers[:] = [h]
    root.setLevel(logging.INFO)
    h.setLevel(logging.WARNING if quiet or _launch_rank() else logging.INFO)  # torchrun: rank 0 reports
    root.propagate = False


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def cmd_run(a: argparse.Namespace) -> int:
    from ptcl.engine.runner import run
    from ptcl.report.results import task_table

    config, overrides = None, list(a.args)
    if overrides and "=" not in overrides[0]:
        config = overrides.pop(0)
    if a.resume is not None and (config or overrides):
        raise PtclError("--resume takes no config or overrides: the run folder's config.yaml is used")
    if a.resume is not None and a.out is not None:
        raise PtclError("--resume continues RUN_DIR in place; it cannot be combined with --out")
    if a.from_task is not None and a.resume is None:
        raise PtclError("--from-task is for --resume: it names the finished task to continue after")
    if a.pilot_config is not None:
        from ptcl.pilot import load_pilot

        if config is not None or a.resume is not None:
            raise PtclError("--pilot-config replaces CONFIG and cannot be resumed with: give only key=value overrides")
        config = load_pilot(a.pilot_config, overrides)
    m = run(config, overrides, out=a.out, resume=a.resume, quiet=a.quiet, max_tasks=a.max_tasks,
            from_task=a.from_task)
    if _launch_rank() == 0:  # torchrun: every rank holds the same results; rank 0 prints them
        _out(task_table(m))
        _out(f"run folder: {m['run_dir']}")
    return 0


def cmd_import_pilot(a: argparse.Namespace) -> int:
    import ptcl.methods  # noqa: F401  (fills the method registry)
    from ptcl.io import atomic_write_text
    from ptcl.pilot import pilot_yaml

    text = pilot_yaml(a.pilot, a.overrides)
    if a.output is None:
        _out(text.rstrip("\n"))
    else:
        atomic_write_text(a.output, text)
        _out(f"wrote {a.output}")
    return 0


def cmd_list(a: argparse.Namespace) -> int:
    from ptcl.registry import BACKBONES, DATASETS, METHODS  # filled by ``import ptcl``

    reg = {"methods": METHODS, "backbones": BACKBONES, "datasets": DATASETS}[a.what]
    for name in reg.names():
        obj = reg.get(name)
        doc = (obj.__doc__ or "").strip().splitlines()
        _out(f"{name:<26} {doc[0] if doc else ''}")
        if a.verbose and a.what == "methods":
            _out(options_table(obj.config_cls, indent="    ") + "\n")
    if a.what == "backbones":
        _out(f"{'<any timm model>':<26} e.g. vit_base_patch16_224.augreg_in21k (needs the network once)")
    return 0


def options_table(cls: type, indent: str = "") -> str:
    """Every option of config class ``cls``: name, type, default, bounds, help, source."""
    from ptcl.options import describe

    lines = []
    for o in describe(cls):
        if o.name == "name":
            continue
        extra = "; ".join(x for x in (o.bounds, o.help, f"source: {o.source}" if o.source else "") if x)
        lines.append(f"{indent}{o.name:<20} {o.type:<28} default {o.default!r:<12} {extra}")
    return "\n".join(lines)


def cmd_show(a: argparse.Namespace) -> int:
    import inspect

    from ptcl.registry import METHODS

    cls = METHODS.get(a.method)
    module_doc = inspect.getdoc(inspect.getmodule(cls)) or ""
    _out(f"{a.method}: {(cls.__doc__ or '').strip().splitlines()[0] if cls.__doc__ else ''}")
    if module_doc:
        _out("\n" + module_doc.split("\n\n")[0] + "\n")
    _out("options (method.<name>=VALUE):")
    _out(options_table(cls.config_cls, indent="  "))
    return 0


def cmd_compare(a: argparse.Namespace) -> int:
    from ptcl.io import writable_dir_error
    from ptcl.report.plots import plot_curves
    from ptcl.report.results import compare_table, protocol_warning, read_metrics

    plot = None
    if a.plot is not None:
        plot = Path(os.path.realpath(Path(a.plot).expanduser()))  # write through a symlink
        why = writable_dir_error(plot.parent, "the folder of --plot")
        if why is None and plot.exists() and not plot.is_file():
            why = f"--plot {a.plot} exists and is not a regular file"
        if why:
            raise PtclError(f"{why}; give a writable PNG path")
    runs = {str(Path(r)): read_metrics(r) for r in a.runs}
    _out(compare_table(runs))
    warning = protocol_warning(runs)
    if warning:
        sys.stderr.write(f"ptcl: warning: {warning}\n")
    if plot is not None:
        try:
            plot_curves({f"{m['method']} ({Path(k).name})": m for k, m in runs.items()}, plot)
        except OSError as e:
            raise PtclError(f"cannot write the plot {a.plot}: {e}") from None
        _out(f"plot: {a.plot}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ptcl", description="Class-incremental learning with pre-trained models")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run or resume an experiment")
    r.add_argument("args", nargs="*", help="[CONFIG.yaml|json] [key=value ...]")
    r.add_argument("--out", help="run folder (default runs/<method>_<dataset>_<time>)")
    r.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run")
    r.add_argument("--max-tasks", type=int, help="stop (resumably) after this many tasks")
    r.add_argument("--from-task", type=int, metavar="TASK",
                   help="with --resume: continue after this finished task (its checkpoint must be "
                        "kept), dropping the records of later tasks")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress bars or info logs")
    r.add_argument("--pilot-config", metavar="PILOT_JSON", help="a LAMDA-PILOT exps/*.json file instead of CONFIG")
    r.set_defaults(fn=cmd_run)
    ip = sub.add_parser("import-pilot", help="convert a LAMDA-PILOT exps/*.json file to a ptcl YAML config")
    ip.add_argument("pilot", metavar="PILOT_JSON")
    ip.add_argument("overrides", nargs="*", help="key=value (e.g. dataset.root=PATH)")
    ip.add_argument("-o", "--output", metavar="OUT_YAML", help="write here (default: print)")
    ip.set_defaults(fn=cmd_import_pilot)
    ls = sub.add_parser("list", help="list registered components")
    ls.add_argument("what", choices=["methods", "backbones", "datasets"])
    ls.add_argument("-v", "--verbose", action="store_true", help="methods: also every option")
    ls.set_defaults(fn=cmd_list)
    sh = sub.add_parser("show", help="a method's paper and every option (type, default, help, source)")
    sh.add_argument("method")
    sh.set_defaults(fn=cmd_show)
    c = sub.add_parser("compare", help="compare finished runs")
    c.add_argument("runs", nargs="+", metavar="RUN_DIR")
    c.add_argument("--plot", metavar="FILE", help="also write the accuracy curves to this PNG")
    c.set_defaults(fn=cmd_compare)
    return p


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv``; ``key=value`` overrides may also come after the options
    (``ptcl run CONFIG --out DIR lr=0.1``), which argparse alone refuses."""
    parser = build_parser()
    a, extra = parser.parse_known_args(argv)
    target = {"run": "args", "import-pilot": "overrides"}.get(a.cmd)
    late = [x for x in extra if target and not x.startswith("-") and "=" in x]
    if len(late) != len(extra):
        parser.error(f"unrecognized arguments: {' '.join(x for x in extra if x not in late)}")
    if late:
        setattr(a, target, [*getattr(a, target), *late])
    return a


def main(argv: list[str] | None = None) -> int:
    a = _parse(argv)
    _setup_logging(getattr(a, "quiet", False))
    try:
        return a.fn(a)
    except PtclError as e:
        sys.stderr.write(f"ptcl: error: {one_line(e)}\n")
        return 2
    except KeyboardInterrupt as e:
        sys.stderr.write(f"ptcl: {getattr(e, 'message', 'interrupted')}\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
