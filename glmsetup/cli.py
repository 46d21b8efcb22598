"""The `glmsetup` Click group.

Thin by design: each verb lives in glmsetup/commands/<verb>.py, parses its options, calls one core
function and renders the result through glmsetup.output. Commands are imported lazily and none of
them imports torch at module level, so `glmsetup --help` and `glmsetup doctor` work without it.
Errors of the GlmsetupError family are mapped to a message, a hint and an exit code here, in one
place; set GLMSETUP_DEBUG=1 to see the traceback instead.
"""
from __future__ import annotations

import difflib
import importlib
import importlib.util
import os
import sys
from typing import Callable

import click

from glmsetup import __version__
from glmsetup.errors import GlmsetupError, Interrupted

# verb -> "module:attribute"; the order is the order of `glmsetup --help`.
COMMANDS: dict[str, str] = {
    "doctor": "glmsetup.commands.doctor:doctor",
    "estimate": "glmsetup.commands.estimate:estimate",
    "profiles": "glmsetup.commands.profiles:profiles",
    "fetch": "glmsetup.commands.fetch:fetch",
    "verify": "glmsetup.commands.fetch:verify",
    "convert": "glmsetup.commands.convert:convert",
    "patch": "glmsetup.commands.patch:patch",
    "run": "glmsetup.commands.run:run",
    "finetune": "glmsetup.commands.finetune:finetune",
    "selftest": "glmsetup.commands.selftest:selftest",
}

JSON_KEY = "glmsetup.json"
NAME_KEY = "glmsetup.command"


def json_option(f: Callable) -> Callable:
    """--json: print one versioned JSON envelope on stdout and nothing else."""

    def callback(ctx: click.Context, _param, value: bool):
        ctx.meta[NAME_KEY] = command_name(ctx)  # errors are reported under this verb
        if value:
            ctx.meta[JSON_KEY] = True
        return value

    return click.option(
        "--json", "json_mode", is_flag=True, is_eager=True, callback=callback,
        help="Print a JSON envelope on stdout (see docs/reference/json.md); no colour, no progress.",
    )(f)


def command_name(ctx: click.Context) -> str:
    return " ".join(ctx.command_path.split()[1:]) or "glmsetup"


class Group(click.Group):
    """Lazy verbs, and the one place where GlmsetupError becomes a message, a hint and an exit code.

    Also used for verbs with sub-verbs (`glmsetup profiles show`): errors surface through the root.
    """

    def list_commands(self, ctx):
        if self is not main:
            return super().list_commands(ctx)
        present = [n for n, t in COMMANDS.items() if importlib.util.find_spec(t.split(":")[0]) is not None]
        return present + sorted(set(self.commands) - set(COMMANDS))

    def get_command(self, ctx, name):
        if name in self.commands or self is not main:
            return self.commands.get(name)
        target = COMMANDS.get(name)
        if target is None or importlib.util.find_spec(target.split(":")[0]) is None:
            return None
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)

    def resolve_command(self, ctx, args):
        try:
            return super().resolve_command(ctx, args)
        except click.UsageError as exc:  # `glmsetup doctr`: the nearest verb as the hint, JSON if asked for
            if "--json" in args:
                ctx.meta[JSON_KEY] = True
            if not getattr(exc, "possibilities", None):  # click looks only among the verbs it has loaded
                exc.possibilities = difflib.get_close_matches(args[0] if args else "", self.list_commands(ctx), n=1)
            exc.glmsetup_what = "commands"
            raise

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except GlmsetupError as exc:
            _fail(ctx, exc)
        except click.UsageError as exc:  # a bad option or argument: error and hint lines (an envelope under --json)
            _fail(ctx, _usage_error(exc))
        except KeyboardInterrupt:
            _fail(ctx, Interrupted("interrupted", hint="run the same command again to continue where it stopped"))


    def parse_args(self, ctx, args):
        if not args and self is main:  # bare `glmsetup`: the help, and success
            click.echo(ctx.get_help(), color=ctx.color)
            ctx.exit(0)
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:  # `glmsetup --bogus`: raised before invoke
            if "--json" in args:
                ctx.meta[JSON_KEY] = True
            _fail(ctx, _usage_error(exc))


def _usage_error(exc: click.UsageError) -> GlmsetupError:
    """Click's usage error in the error/hint format; the hint names the verb's --help."""
    from glmsetup.errors import UsageError

    where = " ".join(["glmsetup", command_name(exc.ctx)] if exc.ctx and exc.ctx.parent else ["glmsetup"])
    possible = getattr(exc, "possibilities", None)  # click's "Did you mean" goes to the hint
    message = " ".join((exc.message if possible else exc.format_message()).split())  # one line, always
    hint = f"{where} --help lists the {getattr(exc, 'glmsetup_what', 'options')}"
    if possible:
        hint = f"did you mean {' or '.join(possible)}? {hint}"
    return UsageError(message, hint=hint)


def _fail(ctx: click.Context, exc: GlmsetupError):
    from glmsetup import output

    if os.environ.get("GLMSETUP_DEBUG") == "1":
        raise exc
    output.error(ctx.meta.get(NAME_KEY, "glmsetup"), exc, json_mode=bool(ctx.meta.get(JSON_KEY)))
    sys.exit(exc.exit_code)


@click.group(
    cls=Group,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog="""\b
Examples:
  glmsetup doctor                      what fits this machine, and what to fix
  glmsetup fetch                       download ChatGLM2-6B (resumable, verified)
  glmsetup run web --profile auto      chat in the browser
  glmsetup selftest                    one-minute end-to-end check with a tiny model

Docs: the docs/ folder of the glmsetup repository (tutorial.md first), or glmsetup COMMAND --help.
Set GLMSETUP_HOME to move all state.""",
)
@click.version_option(__version__, "-V", "--version", prog_name="glmsetup")
def main():
    """Set up and run ChatGLM2-6B: check the machine, fetch the weights, fix the demos, run them."""


def run_command(ctx: click.Context, command: str, core: Callable, human: Callable, /, *, ok=None, **kwargs):
    """Call one core function and render its result; `ok(data)` decides exit 0 or 1."""
    from glmsetup import output

    json_mode = bool(ctx.meta.get(JSON_KEY))
    data = core(**kwargs)
    good = ok(data) if ok else True
    output.emit(command, data, human, json_mode=json_mode, ok=good)
    if not good:
        ctx.exit(1)
    return data
