"""The ``adaptzip`` command line. It only parses options, calls :mod:`adaptzip.api` and prints:
results on stdout (one JSON object with ``--json``), everything else on stderr.

Form options are not written here: :func:`with_form_options` makes one ``--<field>`` per field of
every registered form's Config dataclass. The module is longer than ~500 lines because each
command declares its options with their help text inline — ``--help`` and docs/cli.md
(scripts/gen_cli_docs.py) are generated from them."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect as pyinspect
import json
import shlex
import signal
import sys
import typing
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from . import api, fileio, progress, runtime
from .errors import AdaptzipError, OptionError, os_error
from .forms import BASELINE, REGISTRY
from .options import CALIB_TOKENS, CalibrationOptions, FitOptions, QuantOptions, RunOptions, parse_duration

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Convert PEFT LoRA adapters into compact parameter-shared forms, and back.",
)
err = Console(stderr=True)
_STATE = {"debug": False}

FormName = Enum("FormName", {n.replace("-", "_"): n for n in sorted(REGISTRY)}, type=str)  # type: ignore[misc]
# compress also takes "auto" (needs --budget and --base-model: picks the form by eval KL)
CompressTo = Enum("CompressTo", {**{n.replace("-", "_"): n for n in sorted(REGISTRY)}, "auto": "auto"}, type=str)  # type: ignore[misc]


class Quant(str, Enum):
    none = "none"
    int8 = "int8"
    int4 = "int4"
    int4_asym = "int4-asym"
    auto = "auto"


class DType(str, Enum):
    fp16 = "fp16"
    bf16 = "bf16"
    fp32 = "fp32"


ExpandTo = Enum("ExpandTo", {t.replace("-", "_"): t for t in api.expand_targets()}, type=str)  # type: ignore[misc]


class Target(str, Enum):
    peft = "peft"
    vllm = "vllm"


JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout (human output suppressed).")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace the output if it exists.")]
ThreadsOpt = Annotated[
    int | None,
    typer.Option(
        "--threads",
        min=1,
        help="torch threads (default: the CPU cores idle when the command starts).",
        show_default=False,
    ),
]
QuietOpt = Annotated[
    bool,
    typer.Option("--quiet", "-q", help="No progress bars on stderr (they are shown on a terminal, also with --json)."),
]


class Precision(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"


def _command() -> str:
    return "adaptzip " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _emit(result: Any, as_json: bool, human) -> None:
    if as_json:
        sys.stdout.write(json.dumps(result, default=str, allow_nan=True) + "\n")
    else:
        human(result)


def _warn(lines: list[str]) -> None:
    """What the user must know although the command succeeded: one plain stderr line each (also
    with --json, whose object carries the same facts)."""
    for line in lines:
        sys.stderr.write(f"adaptzip: warning: {' '.join(line.split())}\n")


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


def _kv_table(title: str, rows: dict) -> None:
    t = Table(title=title, show_header=False)
    for k, v in rows.items():
        t.add_row(str(k), f"{v:.4g}" if isinstance(v, float) else str(v))
    err.print(t)


def _fit_args(to: Any, form_options: dict | None, opt: list[str] | None, dtype: Any, seed: int) -> dict[str, Any]:
    """``to``, ``options`` (generated form options, then ``--opt`` pairs) and ``fitting``, as
    compress and batch take them."""
    return {
        "to": str(to.value if isinstance(to, Enum) else to),
        "options": {**(form_options or {}), **_parse_opts(opt)},
        "fitting": FitOptions(dtype=None if dtype is None else dtype.value, seed=seed),
    }


def _parse_opts(opts: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for o in opts or []:
        if "=" not in o:
            raise OptionError(None, f"--opt {o!r}: expected KEY=VALUE")
        k, v = o.split("=", 1)
        out[k.strip().replace("-", "_")] = _auto_value(v.strip())
    return out


def _auto_value(v: str) -> Any:
    if "," in v:
        return tuple(_auto_value(x) for x in v.split(",") if x)
    for cast in (int, float):
        with contextlib.suppress(ValueError):
            return cast(v)
    return {"true": True, "false": False, "none": None}.get(v.lower(), v)


# ------------------------------------------------------------------ form options from the Config dataclasses
def _cli_type(t: Any) -> type:
    """The CLI type of a Config field: int, float, bool or str (str is parsed by :func:`_auto_value`:
    ``2,4,16`` is a tuple)."""
    args = [a for a in typing.get_args(t) if a is not type(None)]
    if typing.get_origin(t) in (typing.Union, getattr(__import__("types"), "UnionType", None)) and len(args) == 1:
        t = args[0]
    return t if t in (int, float, bool, str) else str


def _form_fields() -> dict[str, dict]:
    """Every user-facing Config field of every registered form, merged by name: its CLI type (str
    when forms disagree), whether some form declares it a tuple, and help grouped by form."""
    out: dict[str, dict] = {}
    for name, cls in sorted(REGISTRY.items()):
        hints = typing.get_type_hints(cls.Config)
        for f in dataclasses.fields(cls.Config):
            if f.metadata.get("internal"):
                continue
            d = out.setdefault(f.name, {"types": set(), "tuple": False, "help": {}})
            d["types"].add(_cli_type(hints[f.name]))
            d["tuple"] |= "tuple" in str(hints[f.name])
            d["help"].setdefault(f.metadata.get("help", ""), []).append(name)
    return out


_FORM_FIELDS = _form_fields()


def _form_params(taken: set[str]) -> list[pyinspect.Parameter]:
    """One ``--<field>`` option per form field (see :func:`_form_fields`); the command's own
    options keep their names (a clash is a programming error, caught here)."""
    params = []
    for fname, d in sorted(_FORM_FIELDS.items()):
        if fname in taken:
            raise RuntimeError(f"form option {fname!r} clashes with a command option")
        typ = next(iter(d["types"])) if len(d["types"]) == 1 else str
        help_ = "; ".join(f"{', '.join(forms)}: {h}" for h, forms in d["help"].items())
        opt = typer.Option(
            "--" + fname.replace("_", "-"), help=help_, rich_help_panel="Form options (see `adaptzip forms`)"
        )
        params.append(
            pyinspect.Parameter(
                fname, pyinspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[typ | None, opt]
            )
        )
    return params


def _form_value(fname: str, v: Any) -> Any:
    if not isinstance(v, str):
        return v
    x = _auto_value(v)
    return (x,) if _FORM_FIELDS[fname]["tuple"] and not isinstance(x, tuple) else x


def with_form_options(fn):
    """Give a command one option per form field (generated from the forms' Config dataclasses, so a
    new form's options appear by themselves); ``fn`` receives the given ones as ``form_options``."""
    sig = pyinspect.signature(fn, eval_str=True)
    own = [
        p.replace(kind=pyinspect.Parameter.KEYWORD_ONLY) for p in sig.parameters.values() if p.name != "form_options"
    ]
    extra = _form_params({p.name for p in own})
    names = [p.name for p in extra]

    @functools.wraps(fn)
    def wrapper(**kw):
        given = {n: _form_value(n, kw.pop(n)) for n in names if kw.get(n) is not None}
        for n in names:
            kw.pop(n, None)
        return fn(**kw, form_options=given)

    wrapper.__signature__ = sig.replace(parameters=own + extra)  # type: ignore[attr-defined]
    return wrapper


@app.callback()
def _main(
    ctx: typer.Context,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
) -> None:
    _STATE["debug"] = debug
    progress.set_debug(debug)
    ctx.with_resource(progress.quiet_third_party())  # for the whole command (restored when it ends)


@app.command()
def inspect(
    lora_dir: Annotated[Path, typer.Argument(help="PEFT LoRA adapter directory.", readable=False)],
    as_json: JsonOpt = False,
    threads: ThreadsOpt = None,
) -> None:
    """Show an adapter: base model, PEFT version, modules per type and layer, ranks, alphas/scales,
    dtype, parameters, bytes, and a per-module spectrum (effective rank, energy in top-k)."""
    runtime.use_threads(threads)
    res = api.inspect(lora_dir)
    if res.get("config_mismatch"):
        _warn([f"{Path(res['path']) / 'adapter_config.json'}: {res['config_mismatch']['message']}"])

    def human(r):
        _kv_table(
            f"adapter {r['path']}",
            {
                k: r[k]
                for k in (
                    "base_model",
                    "peft_version",
                    "weights_file",
                    "bytes",
                    "dtype",
                    "n_modules",
                    "n_params",
                    "use_rslora",
                    "use_dora",
                    "fan_in_fan_out",
                )
            },
        )
        _kv_table("modules per type", r["modules_per_type"])
        _kv_table("ranks / alphas / scales", {"ranks": r["ranks"], "alphas": r["alphas"], "scales": r["scales"]})
        if r["carried"]:
            _kv_table("carried tensors", {c["key"]: c["role"] for c in r["carried"]})
        t = Table(title="per-module spectrum")
        for col in ("module", "in", "out", "r", "scale", "‖ΔW‖", "eff. rank", "energy top-1", "top-4"):
            t.add_column(col)
        for m in r["modules"]:
            t.add_row(
                m["name"],
                str(m["in"]),
                str(m["out"]),
                str(m["rank"]),
                f"{m['scale']:.4g}",
                f"{m['norm']:.4g}",
                f"{m['effective_rank']:.2f}",
                f"{m['energy_top'].get('1', 0):.3f}",
                f"{m['energy_top'].get('4', 1.0):.3f}",
            )
        err.print(t)

    _emit(res, as_json, human)


@app.command()
def forms(as_json: JsonOpt = False) -> None:
    """List the registered forms with their options and defaults."""
    res = api.list_forms()

    def human(r):
        for f in r:
            t = Table(title=f"[bold]{f['name']}[/]: {f['summary']}", title_justify="left")
            t.add_column("option")
            t.add_column("default")
            t.add_column("help")
            for o in f["options"]:
                t.add_row("--" + o["name"].replace("_", "-"), str(o["default"]), o["help"])
            err.print(t)

    _emit({"forms": res}, as_json, lambda r: human(r["forms"]))


@app.command()
@with_form_options
def compress(
    ctx: typer.Context,
    lora_dir: Annotated[Path, typer.Argument(help="PEFT LoRA adapter directory.", readable=False)],
    output: Annotated[
        Path, typer.Option("-o", "--output", help="Container file to write (.safetensors).", readable=False)
    ],
    to: Annotated[
        CompressTo,
        typer.Option(
            "--to",
            help="Target form (see `adaptzip forms`), or 'auto': with --budget and --base-model, try the forms that fit and keep the best by eval KL.",
        ),
    ] = BASELINE,  # type: ignore[assignment]
    budget: Annotated[
        str | None,
        typer.Option(
            help="Size of the whole container: a fraction of the source's bytes (0.25) or a size (5MB, 300KiB)."
        ),
    ] = None,
    opt: Annotated[list[str] | None, typer.Option("--opt", help="Any form option as KEY=VALUE (repeatable).")] = None,
    dtype: Annotated[DType | None, typer.Option(help="Container float dtype (default: the source's).")] = None,
    seed: Annotated[
        int,
        typer.Option(
            help="Random seed: same inputs and seed give a byte-identical container (on the same machine, torch build and thread count)."
        ),
    ] = 0,
    base_model: Annotated[
        Path | None,
        typer.Option(
            "--base-model",
            help="Base model: a local model directory (safetensors) or a .gguf file. Enables calibration: Σ-weighted fit, distillation, KL metrics.",
            readable=False,
        ),
    ] = None,
    calib: Annotated[
        Path | None,
        typer.Option(
            "--calib",
            help="Calibration text: UTF-8 text (paragraphs separated by blank lines) or JSONL with a 'text' field.",
            readable=False,
        ),
    ] = None,
    calib_tokens: Annotated[
        int | None,
        typer.Option(
            "--calib-tokens",
            help=f"Calibration tokens to use (10% held out for early stopping, 10% more for eval without --eval); default: up to {CALIB_TOKENS}, all of a shorter text; a number given here must be in the text.",
            show_default=False,
        ),
    ] = None,
    calib_steps: Annotated[
        int,
        typer.Option(
            "--calib-steps",
            help="Distillation step cap per form (batches of 4×128 tokens); it stops earlier when the held-out KL has converged, and the cap grows (see --calib-max-steps) while the KL still falls fast; 0 skips distillation.",
        ),
    ] = 300,
    calib_max_steps: Annotated[
        int | None,
        typer.Option(
            "--calib-max-steps",
            help="How far the step cap may grow while the held-out KL still falls by more than 2% per third of --calib-steps [default: 3 × --calib-steps; equal to --calib-steps: a fixed cap].",
        ),
    ] = None,
    calib_time: Annotated[
        str | None,
        typer.Option(
            "--calib-time",
            help="Wall-clock budget for all distillation of this compress (600, 90s, 10m, 1.5h), shared by the forms distilled (the form and its svd baseline; auto's shortlist); steps then follow from the measured step time.",
        ),
    ] = None,
    calib_lr: Annotated[
        float | None,
        typer.Option(
            "--calib-lr",
            help="Distillation learning rate (default: probed — 1e-4, 3.16e-4, 1e-3 and 3.16e-3, and higher while the largest wins, each run a few steps from the start and the best on the held-out text is kept).",
        ),
    ] = None,
    precision: Annotated[
        Precision,
        typer.Option(
            "--precision",
            help="Of the distillation steps: auto (bf16 autocast on a CPU with AVX-512-BF16/AMX or a CUDA GPU with bf16, else fp32), fp32 or bf16. The form's parameters, optimiser state and losses stay fp32; teacher caches, Σ, held-out checks and eval metrics are always computed in fp32.",
        ),
    ] = Precision.auto,
    eval_text: Annotated[
        Path | None,
        typer.Option("--eval", help="Evaluation text (default: a held-out part of --calib).", readable=False),
    ] = None,
    stats: Annotated[
        Path | None,
        typer.Option(
            "--stats",
            help="Σ statistics file: reused when it exists (exact or sketched), else the exact in×in Σ of every adapted input is written there. Default: a sketch, exact on the source's row space, written to <output>.stats.safetensors (formats/stats.md). Alone (no --base-model): a Σ-weighted fit.",
            readable=False,
        ),
    ] = None,
    device: Annotated[str, typer.Option("--device", help="auto (CUDA when available), cpu or cuda.")] = "auto",
    quant: Annotated[
        Quant,
        typer.Option(
            "--quant",
            help="Storage of the form's float tensors: none (the container dtype); int8 (symmetric, fp16 scale per group); int4 (two codes per byte, symmetric, fp16 scale per group); int4-asym (plus fp16 zero points); auto (needs --budget: bits per svd direction, or per tensor, and ranks chosen to minimise the error; never worse than none/int8/int4 at the same bytes). See docs/quantization.md.",
        ),
    ] = Quant.none,
    group_size: Annotated[
        int,
        typer.Option(
            "--group-size",
            help="Values per quantisation group (one fp16 scale each), along the input dimension of A and the output dimension of B: each rank direction gets its own scales.",
        ),
    ] = 64,
    threads: ThreadsOpt = None,
    quiet: QuietOpt = False,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    form_options: dict[str, Any] | None = None,
) -> None:
    """Fit a PEFT LoRA into a compact form and write one container; prints size, error and the
    same-bytes svd baseline's error (with --base-model: KL, top-1 agreement and improvement kept,
    before and after distillation)."""
    runtime.use_threads(threads)
    calibration = None
    if base_model is None:  # options that only calibration reads are refused, not silently ignored
        given = _given(ctx, "device", "calib_lr", "calib_steps", "calib_max_steps", "calib_tokens", "precision")
        if given:
            raise OptionError(None, f"{given[0]} applies to calibration: it needs --base-model and --calib")
    if any(v is not None for v in (base_model, calib, eval_text, stats, calib_time)):
        calibration = CalibrationOptions(
            base_model=base_model,
            calib=calib,
            tokens=calib_tokens,
            steps=calib_steps,
            max_steps=calib_max_steps,
            eval_text=eval_text,
            stats_file=stats,
            device=device,
            lr=calib_lr,
            seconds=None if calib_time is None else parse_duration(calib_time),
            precision=precision.value,
        )
    res = api.compress(
        lora_dir,
        output,
        budget=budget,
        **_fit_args(to, form_options, opt, dtype, seed),
        calibration=calibration,
        quant=QuantOptions(scheme=quant.value, group_size=group_size),
        run=RunOptions(force=force, progress=not quiet, command=_command()),
    ).to_json()
    unused = [] if res.get("sharing_used", True) else [f"sharing not used by {res['form']}: {res['sharing']}"]
    _warn(res.get("warnings", []) + unused)

    def human(r):
        rows = {
            "output": r["output"],
            "form": r["form"],
            "source bytes": _fmt_bytes(r["source_bytes"]),
            "container bytes": _fmt_bytes(r["bytes"]),
            "ratio": f"{r['ratio']:.4f}",
            "stored params": r["stored_params"],
            "rel. error": r["rel_error"],
            "worst module": f"{r['worst_module_rel_error']:.4g} ({r['worst_module']})",
        }
        if "svd_baseline_rel_error" in r:
            rows["svd baseline (same bytes)"] = r["svd_baseline_rel_error"]
        if "sharing_used" in r:
            rows["sharing"] = ("used: " if r["sharing_used"] else "NOT used: ") + r["sharing"]
        if "quant" in r:
            q = r["quant"]
            rows["storage"] = (
                f"{q['scheme']}"
                + (f" → {q['auto']['chosen']}" if "auto" in q else "")
                + f", groups of {q['group_size']}, row bits {q['row_bits']}"
            )
        _kv_table("compressed", rows)
        if "kl_after" in r or "objective_after" in r:
            _calibration_tables(r)

    _emit(res, as_json, human)


def _calibration_tables(r: dict) -> None:
    """Before/after distillation for the form and the same-bytes svd baseline; auto's candidates."""
    t = Table(title=f"calibration ({r.get('task')}; eval on {r.get('eval_text')} text, {r.get('eval_tokens')} tokens)")
    for col in ("", "KL before", "KL after", "top-1 before", "top-1 after", "kept before", "kept after"):
        t.add_column(col)

    def f(v):
        return "–" if v is None else f"{v:.4g}"

    for name, p in ((r["form"], ""), ("svd (same bytes)", "svd_baseline_")):
        if p + "kl_after" in r or p + "objective_after" in r:
            t.add_row(
                name,
                f(r.get(p + "kl_before")),
                f(r.get(p + "kl_after")),
                f(r.get(p + "top1_agreement_before")),
                f(r.get(p + "top1_agreement")),
                f(r.get(p + "improvement_kept_before")),
                f(r.get(p + "improvement_kept")),
            )
    err.print(t)
    if "ppl_base" in r:
        err.print(
            f"perplexity: base {r['ppl_base']:.4g}, source {r['ppl_source']:.4g}, compressed {r.get('ppl_compressed', 0):.4g}"
        )
    if "auto" in r:
        a = Table(title=f"--to auto chose {r['auto']['chosen']}: {r['auto']['reason']}")
        for col in ("form", "bytes", "output rel. error", "KL start", "KL distilled"):
            a.add_column(col)
        for c in r["auto"]["candidates"]:
            if "skipped" in c:
                a.add_row(c["form"], "–", "–", "–", f"skipped: {c['skipped']}")
            else:
                a.add_row(
                    c["form"], str(c["bytes"]), f(c["output_rel_error"]), f(c["score_before"]), f(c.get("score_after"))
                )
        err.print(a)


@app.command()
def expand(
    container: Annotated[Path, typer.Argument(help="adaptzip container (.safetensors).", readable=False)],
    output: Annotated[
        Path, typer.Option("-o", "--output", help="Output directory (peft, merged) or file (dense).", readable=False)
    ],
    to: Annotated[
        ExpandTo,
        typer.Option(
            "--to",
            help="peft: a PEFT LoRA dir; dense: ΔW per module; merged: base model + ΔW; peft-native: a PEFT dir in the form's own live adaptzip tuner, shared parts held once (bslora-*, masa, vblora); peft-vblora: PEFT's own VB-LoRA dir (vblora containers only).",
        ),
    ] = ExpandTo.peft,
    target: Annotated[
        Target, typer.Option(help="For --to peft: 'vllm' also satisfies vLLM's loader (one global rank, scale folded).")
    ] = Target.peft,
    max_lora_rank: Annotated[
        int | None,
        typer.Option(
            help="vLLM's max_lora_rank (1, 8, 16, 32, 64, 128, 256, 320, 512); larger modules are re-factored by SVD."
        ),
    ] = None,
    base_model: Annotated[
        Path | None, typer.Option(help="Base model directory (safetensors) for --to merged.", readable=False)
    ] = None,
    dtype: Annotated[DType | None, typer.Option(help="Output float dtype (default: container's; dense: fp32).")] = None,
    threads: ThreadsOpt = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Restore a container as a PEFT LoRA directory (also for vLLM), a dense ΔW file, or a merged model."""
    runtime.use_threads(threads)
    res = api.expand(
        container,
        output,
        to=to.value,
        target=target.value,
        max_lora_rank=max_lora_rank,
        base_model=base_model,
        dtype=None if dtype is None else dtype.value,
        force=force,
    )
    _emit(
        res,
        as_json,
        lambda r: _kv_table("expanded", {k: v for k, v in r.items() if not isinstance(v, dict) or len(v) < 8}),
    )


@app.command()
def verify(
    container: Annotated[Path, typer.Argument(help="adaptzip container (.safetensors).", readable=False)],
    threads: ThreadsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Check a container: manifest schema, tensor shapes against the manifest, payload hash."""
    runtime.use_threads(threads)
    res = api.verify(container)
    _emit(
        res,
        as_json,
        lambda r: err.print(
            f"[green]ok[/] {r['path']}: form {r['form']}, {r['tensors']} tensors, {_fmt_bytes(r['bytes'])}"
        ),
    )


class Executor(str, Enum):
    process = "process"
    ray = "ray"


@app.command()
@with_form_options
def batch(
    zoo_dir: Annotated[
        Path,
        typer.Argument(
            help="Folder searched (at any depth) for PEFT LoRA adapters (folders with adapter_config.json).",
            readable=False,
        ),
    ],
    output: Annotated[
        Path,
        typer.Option(
            "-o",
            "--output",
            help="Output folder: OUT/<relative path>.safetensors per adapter, batch.json, batch.md.",
            readable=False,
        ),
    ],
    to: Annotated[FormName, typer.Option("--to", help="Target form (see `adaptzip forms`).")] = BASELINE,  # type: ignore[assignment]
    budget: Annotated[
        str | None,
        typer.Option(help="Size of each container: a fraction of its source's bytes (0.25) or a size (5MB)."),
    ] = None,
    opt: Annotated[list[str] | None, typer.Option("--opt", help="Any form option as KEY=VALUE (repeatable).")] = None,
    dtype: Annotated[DType | None, typer.Option(help="Container float dtype (default: each source's).")] = None,
    seed: Annotated[int, typer.Option(help="Random seed of every fit.")] = 0,
    jobs: Annotated[int | None, typer.Option("--jobs", "-j", help="Worker processes (default: CPU cores).")] = None,
    threads: Annotated[
        int | None,
        typer.Option(
            "--threads",
            min=1,
            help="torch threads per worker (default: the CPU cores idle at start divided among the workers, at least 1).",
            show_default=False,
        ),
    ] = None,
    shared_basis: Annotated[
        bool,
        typer.Option(
            "--shared-basis",
            help="Also store clusters of adapters of the same base model and shapes on shared bases (one A per module, or U and V with a full or diagonal core per adapter), where that saves bytes at equal or lower error. Σ-weighted with --stats FILE (without --base-model); not with distillation or --quant.",
        ),
    ] = False,
    executor: Annotated[
        Executor,
        typer.Option(
            help="process: a local process pool; ray: Ray tasks on the cluster that RAY_ADDRESS names (pip install 'adaptzip[ray]'; no shared filesystem needed: the adapters and containers travel through Ray's object store; with --base-model, it and --calib must be at the same path on every node; --jobs: tasks in flight)."
        ),
    ] = Executor.process,
    base_model: Annotated[
        Path | None,
        typer.Option(
            "--base-model",
            help="Base model, passed to compress: calibrates every adapter (see `adaptzip compress --help`).",
            readable=False,
        ),
    ] = None,
    calib: Annotated[
        Path | None,
        typer.Option(
            "--calib", help="Calibration text, passed to compress (see `adaptzip compress --help`).", readable=False
        ),
    ] = None,
    quant: Annotated[
        Quant | None,
        typer.Option("--quant", help="Quantised storage, passed to compress (see `adaptzip compress --help`)."),
    ] = None,
    group_size: Annotated[
        int | None, typer.Option("--group-size", help="Quantisation group size, passed to compress.")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Redo containers that are already up to date.")] = False,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
    form_options: dict[str, Any] | None = None,
) -> None:
    """Convert every PEFT LoRA adapter below ZOO_DIR, in parallel and resumably. Exit code 0 when all
    converted, 1 when some failed (the rest are converted), 2 on a usage error, 130 when interrupted."""
    from . import zoo
    from .options import DEFAULT_GROUP

    calibration = (
        None if base_model is None and calib is None else CalibrationOptions(base_model=base_model, calib=calib)
    )
    res = zoo.batch(
        zoo_dir,
        output,
        budget=budget,
        **_fit_args(to, form_options, opt, dtype, seed),
        calibration=calibration,
        quant=QuantOptions(
            "none" if quant is None else quant.value, DEFAULT_GROUP if group_size is None else group_size
        ),
        jobs=jobs,
        threads=threads,
        force=force,
        shared_basis=shared_basis,
        executor=executor.value,
        progress=not quiet and err.is_terminal,
        command=_command(),
    )

    def human(r):
        from rich.markup import escape

        err.print(batch_table(r, err.width))
        tot = r["totals"]
        err.print(
            f"{', '.join(f'{k} {v}' for k, v in sorted(r['counts'].items()))}; zoo {_fmt_bytes(tot['zoo_bytes'])} of "
            f"{_fmt_bytes(tot['source_bytes'])} source" + (f" (ratio {tot['ratio']:.4f})" if tot["ratio"] else "")
        )
        if r.get("sharing"):
            s = r["sharing"]
            err.print(
                f"zoo sharing: {s['shared_groups']} of {len(s['groups'])} groups shared; {_fmt_bytes(s['separate_bytes'])} separate → "
                f"{_fmt_bytes(s['zoo_bytes'])}"
            )
        err.print(f"summary: {escape(str(Path(r['output']) / 'batch.md'))}")

    _emit(res, as_json, human)
    if res["interrupted"]:
        sys.stderr.write(
            "adaptzip: interrupted (finished containers are kept; rerun the same command to convert the rest)\n"
        )
        raise typer.Exit(130)
    if res["failed"]:
        raise typer.Exit(1)


# The batch table's columns, most useful first after the two that always stay (adapter, status):
# on a narrow terminal the last ones are dropped, and adapter names and statuses fold.
_BATCH_COLUMNS = (
    "adapter",
    "status",
    "ratio",
    "error",
    "container bytes",
    "svd-baseline error",
    "source bytes",
    "time",
)
_BATCH_ORDER = ("adapter", "source bytes", "container bytes", "ratio", "error", "svd-baseline error", "time", "status")


def batch_table(r: dict, width: int) -> Table:
    """The batch result table for a terminal ``width`` columns wide. It always keeps the adapter
    names and the statuses (folded when long); the other columns are kept in order of use
    (ratio, error, container bytes, svd-baseline error, source bytes, time) while they fit."""
    from rich.markup import escape

    f = lambda x: "–" if x is None else f"{x:.4g}"  # noqa: E731
    cells: dict[str, list[str]] = {c: [] for c in _BATCH_ORDER}
    for a in r["adapters"]:
        cells["adapter"].append(a["adapter"])
        cells["source bytes"].append("–" if a.get("source_bytes") is None else _fmt_bytes(a["source_bytes"]))
        cells["container bytes"].append("–" if a.get("bytes") is None else _fmt_bytes(a["bytes"]))
        cells["ratio"].append(f(a.get("ratio")))
        cells["error"].append(f(a.get("rel_error")))
        cells["svd-baseline error"].append(f(a.get("svd_baseline_rel_error")))
        cells["time"].append(f"{a.get('seconds', 0):.1f}s")
        cells["status"].append(a["status"] + (f": {a['error']}" if a.get("error") else ""))

    def natural(c: str) -> int:  # the widest cell, or the header's longest word (headers wrap)
        return max([len(x) for x in cells[c]] + [max(len(w) for w in c.split())])

    # Widths are set here, not measured by rich (which lets a long unbreakable name push the
    # table past the terminal, where it is cut). Each column costs 3 more (padding and rule).
    nat = {c: natural(c) for c in _BATCH_ORDER}
    used = 1 + 6 + min(nat["adapter"], 20) + min(nat["status"], 16)  # room kept for the two that stay
    keep = {"adapter", "status"}
    for c in _BATCH_COLUMNS[2:]:
        if used + nat[c] + 3 > width:
            break  # this one and the less useful ones are left out
        keep.add(c)
        used += nat[c] + 3
    cols = [c for c in _BATCH_ORDER if c in keep]
    rem = width - 1 - 3 * len(cols) - sum(nat[c] for c in cols if c not in ("adapter", "status"))
    w_adapter = max(1, min(nat["adapter"], max(rem - nat["status"], rem // 2)))
    w_status = max(1, min(nat["status"], rem - w_adapter))
    widths = {**nat, "adapter": w_adapter, "status": w_status}
    t = Table(title=f"batch → {escape(r['output'])}")
    for c in cols:
        t.add_column(c, width=widths[c], overflow="fold", justify="left" if c in ("adapter", "status") else "right")
    for i in range(len(r["adapters"])):
        t.add_row(*(escape(cells[c][i]) for c in cols))
    return t


@app.command()
def report(
    containers: Annotated[list[Path], typer.Argument(help="adaptzip containers (.safetensors).", readable=False)],
    against: Annotated[
        Path | None,
        typer.Option(
            help="The source PEFT LoRA folder: recompute every error, the svd baseline and spectra from it.",
            readable=False,
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Folder for report.md, report.json and the PNG charts.", readable=False)
    ] = None,
    threads: ThreadsOpt = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Sizes, ratios, parameters, per-module errors (worst first), accuracy metrics and bit allocation of
    containers; with --out also charts (error per layer/type, error vs bytes with the svd baseline, spectra)."""
    runtime.use_threads(threads)
    from . import report as rp

    res = rp.report(containers, against=against, out=out, force=force)

    def human(r):
        from rich.markup import escape

        for c in r["containers"]:
            rows = {
                "form": c["form"],
                "bytes": _fmt_bytes(c["bytes"]),
                "ratio vs source": f"{c['ratio_source']:.4f}",
                "ratio vs fp16 LoRA": f"{c['ratio_fp16_lora']:.4f}",
                "stored params": c["params"]["stored"],
                "source params": c["params"]["source"],
                "rel. error": c["rel_error"],
                "error from": c["errors_from"],
            }
            if c.get("svd_baseline_rel_error") is not None:
                rows["svd baseline (same bytes)"] = c["svd_baseline_rel_error"]
            if c.get("shared"):
                rows["shared file"] = f"{c['shared']['file']} ({_fmt_bytes(c['shared']['bytes'])})"
            rows.update({k: v for k, v in c["accuracy"].items()})
            _kv_table(escape(c["path"]), rows)
            if c["modules"]:
                t = Table(title="per-module relative error (worst first)")
                for col in ("module", "layer", "type", "rel. error", "stored rank"):
                    t.add_column(col)
                for m in c["modules"][:15]:
                    t.add_row(
                        escape(m["name"]),
                        str(m["layer"]),
                        escape(m["type"]),
                        f"{m['rel_error']:.4g}" if m["rel_error"] is not None else "–",
                        "–" if m.get("rank") is None else str(m["rank"]),
                    )
                err.print(t)
        if r.get("files"):
            err.print(f"report: {escape(r['files']['report_md'])}")

    _emit(res, as_json, human)


def _given(ctx: typer.Context, *params: str) -> list[str]:
    """The options among ``params`` (parameter names) that the command line sets, as --names."""
    return [
        "--" + p.replace("_", "-")
        for p in params
        if getattr(ctx.get_parameter_source(p), "name", None) == "COMMANDLINE"  # (Typer may vendor click)
    ]


def main(*, process_entry: bool | None = None) -> None:
    """Entry point: one-line errors (``adaptzip: error: <path>: <cause>``), exit 2; tracebacks with --debug.

    SIGINT and SIGTERM unwind the command (its temporary files and the folders it made are
    removed; :func:`adaptzip.runtime.on_signals`), then ``adaptzip: interrupted``, exit 130. A
    command that fails also removes the (empty) folders it made for its output. Once the command
    is over (done, or failed), a signal changes nothing: the exit code is the command's. As the
    process entry (``process_entry``; default: called from ``__main__``, as the console script
    and ``python -m adaptzip.cli`` do) signals stay ignored until the process has exited
    (interpreter shutdown takes a while after a torch run); called in-process (tests), the
    previous handlers come back."""
    if process_entry is None:
        process_entry = sys._getframe(1).f_globals.get("__name__") == "__main__"
    if process_entry:
        runtime.set_signal_handler()
        code = _run()
    else:
        with runtime.on_signals():
            code = _run()
    if code:
        sys.exit(code)


def _run() -> int:
    """Run the command; print its one error line, if any; return the exit code."""
    try:
        try:
            with fileio.undo_folders_on_failure():
                rc = app(standalone_mode=False)  # with standalone_mode=False click returns typer.Exit's code
        finally:
            with contextlib.suppress(ValueError):  # not the main thread: no handlers were set
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # the command is over
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return rc if isinstance(rc, int) else 0
    except (typer.Abort, KeyboardInterrupt, runtime.Interrupted):
        sys.stderr.write("adaptzip: interrupted\n")
        return 130
    except Exception as e:
        if runtime.was_interrupted() and not _STATE["debug"]:  # the interrupt, turned into another error
            sys.stderr.write("adaptzip: interrupted\n")
            return 130
        return _error_line(e)


def _error_line(e: Exception) -> int:
    """Print the one error line of ``e`` and return the exit code (with --debug: raise it)."""
    if isinstance(e, typer.Exit):
        return e.exit_code
    if isinstance(e, OSError) and not _STATE["debug"]:
        e = os_error(e) or e  # a file that could not be read or written: named, as adaptzip's own errors are
    if isinstance(e, AdaptzipError):
        if _STATE["debug"]:
            raise e
        sys.stderr.write(f"adaptzip: error: {e.line()}\n")
        return e.exit_code
    if hasattr(e, "format_message") and isinstance(getattr(e, "exit_code", None), int):
        sys.stderr.write(f"adaptzip: error: {' '.join(e.format_message().split())}\n")
        return e.exit_code  # usage errors (Typer's click): 2
    if _STATE["debug"]:
        raise e
    sys.stderr.write(f"adaptzip: error: {type(e).__name__}: {' '.join(str(e).split())}\n")  # unexpected: still one line
    return 1


if __name__ == "__main__":
    main()
