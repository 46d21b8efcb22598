"""glmsetup convert: the official checkpoint -> a safetensors folder that loads fast and anywhere."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from glmsetup import output
from glmsetup.cli import JSON_KEY, json_option, run_command


def convert_core(src: Optional[Path], dst: Optional[Path], dtype: Optional[str], use_cache: bool, dry_run: bool,
                 progress: bool) -> dict:
    from glmsetup import paths
    from glmsetup.errors import require

    for module in ("torch", "transformers", "safetensors", "sentencepiece"):
        require(module, "runtime")
    from glmsetup.runtime import convert as conv
    from glmsetup.runtime.checkpoint import describe, open_checkpoint

    source = src if src is not None else paths.default_model_dir()
    if dry_run:
        ckpt = open_checkpoint(source)
        chosen = dtype or conv._default_dtype(ckpt)
        target = dst if dst is not None else conv.cache_dir_for(ckpt, chosen)
        if target.exists() and any(target.iterdir()) and not (target / conv.MARK).is_file():
            from glmsetup.errors import UsageError

            raise UsageError(f"{target} exists and is not a glmsetup conversion", hint="choose an empty or new folder")
        weights = sum(f.stat().st_size for f in ckpt.files)
        return {"dry_run": True, "source": str(ckpt.path), "source_kind": ckpt.kind, "destination": str(target),
                "dtype": chosen, "checkpoint": describe(ckpt),
                "estimated_bytes": weights * (2 if chosen == "float32" else 1) * (2 if ckpt.quantization_bit else 1),
                "cached": conv.cached_conversion(ckpt, chosen) is not None}

    def report(line: str) -> None:
        output.stderr().print(f"[dim]{line}[/]")

    data = conv.convert_checkpoint(source, dst, dtype=dtype, use_cache=use_cache, progress=report if progress else None)
    data["dry_run"] = False
    return data


def render_convert(console, data: dict) -> None:
    if data["dry_run"]:
        state = " (already in the cache)" if data["cached"] else ""
        console.print(f"would convert {data['source']} ({data['source_kind']}) to {data['destination']} "
                      f"as {data['dtype']}{state}: about {output.human_bytes(data['estimated_bytes'])}")
        console.print("[dim]dry run: nothing was written[/]")
        return
    how = "found in the conversion cache" if data["from_cache"] else f"converted in {data['seconds']:.1f} s"
    console.print(f"[green]✓[/] {data['source']} -> {data['destination']} ({data['dtype']}, "
                  f"{output.human_bytes(data['bytes'])}, {how})")
    if not data.get("engine_tokenizer"):
        console.print("[yellow]![/] no tokenizer.json was written: engines other than glmsetup need the tokenizer "
                      "from the original folder")
    console.print(f"[dim]load it: glmsetup run cli --model-dir {output.escape(data['destination'])}   "
                  f"or AutoModelForCausalLM.from_pretrained(...) (docs/runtime.md)[/]", soft_wrap=True)


@click.command()
@click.argument("src", required=False, type=click.Path(file_okay=False, path_type=Path))
@click.argument("dst", required=False, type=click.Path(file_okay=False, path_type=Path))
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]),
              help="Weight dtype to store (default: the checkpoint's own, float16). bfloat16 suits CPU profiles.")
@click.option("--no-cache", "no_cache", is_flag=True,
              help="Neither reuse nor fill the conversion cache under $GLMSETUP_HOME/converted.")
@click.option("--dry-run", is_flag=True, help="Check the source and print the plan; write nothing.")
@json_option
@click.pass_context
def convert(ctx, src, dst, dtype, no_cache, dry_run, json_mode):
    """Convert a ChatGLM2-6B folder to safetensors for transformers' own GlmForCausalLM.

    SRC is the official folder (default: where `glmsetup fetch` puts it); DST the folder to write
    (default: the conversion cache, which `glmsetup run` then uses by itself). The result loads
    with AutoModelForCausalLM.from_pretrained(DST) without remote code, carries a chat template
    with the official prompt, and can be served by vLLM, SGLang or TGI (docs/runtime.md).

    \b
    Examples:
      glmsetup convert                                   into the cache, used by `glmsetup run`
      glmsetup convert ~/models/chatglm2-6b ./chatglm2-6b-glm --dtype bfloat16
      glmsetup convert ./chatglm2-6b-int4 ./int4-as-fp16 --no-cache --json
    """
    run_command(ctx, "convert", convert_core, render_convert, src=src, dst=dst, dtype=dtype,
                use_cache=not no_cache, dry_run=dry_run, progress=output.progress_enabled(bool(ctx.meta.get(JSON_KEY))))
