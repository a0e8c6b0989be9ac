"""Every `cryptlayer ...` command line README.md and docs/ show, typed as written: the CLI's
parser must take it (options, arguments, values), so a doc that shows an option the CLI does not
have fails here. Placeholders (img, KEY, sha256:...) stand for any value; `[--json]` is optional
and is typed with the option."""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer.main
from typer import Exit
from typer._click.exceptions import ClickException

from cryptlayer.cli import app

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
OPERATORS = {"|", "||", "&", "&&", ";", ";;", "(", ")", "<", ">", ">>", "<<", "2>", "2>&1"}

# Lines the docs show that today's parser refuses because another item of issue 21 changes the
# CLI to take them, each named. Remove an entry once that item is merged: the test then fails on
# it, saying so.
NOT_YET: dict[str, str] = {}


def _spans(line: str) -> list[str]:
    return [
        (double or single).strip() for double, single in re.findall(r"``(.+?)``|`([^`]+)`", line)
    ]


def _code_lines(text: str) -> Iterator[tuple[int, str]]:
    """Lines inside ``` fences (continuations joined), and `inline code` spans elsewhere."""
    fenced = shell = False
    pending = ""
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            # a config file's fence (toml, json, yaml) holds no command lines
            shell = line.strip().removeprefix("```") in ("", "sh", "bash", "console")
            continue
        if fenced and not shell:
            continue
        if fenced:
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            yield number, pending + line
            pending = ""
        else:
            for span in _spans(line):
                if len(span.split()) > 2:  # a command line, not `cryptlayer gc` named in prose
                    yield number, span


def _commands(line: str) -> Iterator[str]:
    """The `cryptlayer ...` commands in one shell line: its own, and any its comment shows
    (`# or later: cryptlayer sign img --sign-key KEY`)."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = ""
    try:
        tokens = list(lexer)
    except ValueError:  # prose in backticks with an apostrophe
        return
    words: list[str] | None = None
    at_start = True  # where a program is named: not `podman run --runtime cryptlayer`
    for token in tokens:
        if token.startswith("#"):
            break
        if token in OPERATORS:
            if words:
                yield shlex.join(words)
            words = None
            at_start = True
        elif words is not None:
            words.append(token)
        elif at_start and (token == "cryptlayer" or token.endswith("/cryptlayer")):
            words = []
        else:
            at_start = token in ("sudo", "$") or re.fullmatch(r"[A-Z_]+=\S*", token) is not None
    if words:
        yield shlex.join(words)
    if "#" in line:
        comment = line[line.index(" #") + 2 :] if " #" in line else ""
        for found in re.findall(r"\bcryptlayer ([a-z]+ [^;,()]*)", comment):
            yield from _commands(f"cryptlayer {found.strip()}")


def _unbracket(args: list[str]) -> list[str]:
    """`[--json]`, `[--format '{{.Name}}']` typed as the option they show."""
    out, depth = [], 0
    for arg in args:
        if arg.startswith("["):
            arg, depth = arg[1:], depth + 1
        if depth and arg.endswith("]"):
            arg, depth = arg[:-1], depth - 1
        out.append(arg)
    return out


def _option_spans(text: str) -> Iterator[tuple[int, str]]:
    """Prose spans that show options: `--tls-verify=false`, `pull --digest`, `-k image.key`."""
    commands = set(typer.main.get_command(app).commands)  # type: ignore[attr-defined]
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        if fenced:
            continue
        for span in _spans(line):
            words = span.split()
            if not words or words[0] == "cryptlayer":
                continue  # a command line: documented() has it
            named = words[0] in commands and len(words) > 1 and words[1].startswith("-")
            if named or re.fullmatch(r"--?[a-z][a-z0-9-]*(=\S+)?", words[0]):
                yield number, span


def documented() -> list[tuple[str, str]]:
    """(where, command line) for every documented command."""
    found = []
    for path in DOCS:
        for number, line in _code_lines(path.read_text()):
            for command in _commands(line):
                found.append((f"{path.relative_to(ROOT)}:{number}", command))
    return found


def parse(command: str) -> str | None:
    """Why the CLI's parser refuses `cryptlayer COMMAND`, or None if it takes it."""
    group = typer.main.get_command(app)
    args = _unbracket(shlex.split(command))
    try:
        with group.make_context("cryptlayer", list(args)) as ctx:
            rest = [*ctx._protected_args, *ctx.args]  # what the group leaves to the subcommand
            if not rest:
                return "no command"
            sub = group.get_command(ctx, rest[0])
            if sub is None:
                return f"no command {rest[0]!r}"
            with sub.make_context(rest[0], rest[1:], parent=ctx):
                return None
    except Exit:  # --help, --version
        return None
    except ClickException as err:
        return err.format_message()


# Docs about other programs, whose prose options are theirs unless a cryptlayer command is named
# before them (`placeholder --push`): the runtime's (runc's command line) and the engines'.
OTHER_PROGRAMS = {"docs/engines.md": "cryptlayer-runtime's, podman's, docker's, containerd's"}

# Options of other programs that the docs show in prose, beside cryptlayer's.
OTHER_TOOLS = {
    "--offset": "cryptsetup's (docs/benchmarks: where a layer's data starts)",
    "shred -n 3": "GNU shred's, the baseline of the erase benchmark",
    "--security-opt no-new-privileges": "podman's",
    "--annotation org.cryptlayer.image=...": "podman's (README.md, Engines)",
}


def _fill(command: Any, args: list[str]) -> list[str]:
    """`args` with placeholders for what a prose fragment leaves out: a value after an option
    that takes one, required options, and the command's arguments."""
    options = {o: p for p in command.params if p.param_type_name == "option" for o in p.opts}
    out: list[str] = []
    for i, arg in enumerate(args):
        out.append(arg)
        param = options.get(arg)
        takes_value = param is not None and not param.is_flag and param.nargs == 1
        if takes_value and (i + 1 == len(args) or args[i + 1].startswith("-")):
            out.append("1")  # a value any type takes (a number, a name, a path)
    given = {a.split("=")[0] for a in args}
    for param in command.params:
        if param.param_type_name == "option" and param.required and not given & set(param.opts):
            out = [param.opts[0], "x", *out]
    needed = [p for p in command.params if p.param_type_name == "argument" and p.required]
    return out + ["x"] * len(needed)


def parse_fragment(fragment: str) -> str | None:
    """Why no command takes a prose fragment's options (`pull --digest`, `--tls-verify=false`),
    with placeholders for the rest; None if one does."""
    group = typer.main.get_command(app)
    words = shlex.split(fragment)
    names = list(group.commands)  # type: ignore[attr-defined]
    if words[0] in names:
        names, words = [words[0]], words[1:]
    option = words[0].split("=")[0]
    with group.make_context("cryptlayer", ["ps"]) as ctx:
        if any(option in p.opts for p in group.get_params(ctx)):
            return None  # --debug, --version, --help: the group's own
    why = f"no command has {option}"
    for name in names:
        command = group.commands[name]  # type: ignore[attr-defined]
        if not any(option in p.opts + p.secondary_opts for p in command.params):
            if len(names) == 1:
                return f"{name} has no {option}"
            continue
        try:
            with (
                group.make_context("cryptlayer", [name]) as ctx,
                command.make_context(name, _fill(command, words), parent=ctx),
            ):
                return None
        except Exit:
            return None
        except ClickException as err:
            why = f"{name}: {err.format_message()}"
    return why


def fragments() -> list[tuple[str, str]]:
    """(where, fragment) for every prose span showing cryptlayer's options; `--x/--y` is two."""
    found = []
    for path in DOCS:
        for number, span in _option_spans(path.read_text()):
            if span in OTHER_TOOLS:
                continue
            if str(path.relative_to(ROOT)) in OTHER_PROGRAMS and span.startswith("-"):
                continue
            head, _, rest = span.partition(" ") if not span.startswith("-") else ("", "", span)
            first, _, tail = rest.partition(" ")
            for alternative in first.split("/"):
                text = " ".join(x for x in (head, alternative, tail) if x)
                found.append((f"{path.relative_to(ROOT)}:{number}", text))
    return found


COMMANDS = documented()
FRAGMENTS = fragments()


def test_the_docs_show_commands() -> None:
    """What is extracted: fenced lines, commands in their comments, inline command lines, and
    prose options; and the checks refuse what the CLI does not take."""
    lines = {command for _, command in COMMANDS}
    assert "keygen image.key" in lines  # a fenced line
    assert "sign img --sign-key KEY" in lines  # from a comment: `# or later: cryptlayer sign ...`
    assert "verify IMAGE '[--trust' 'FILE]'" in lines  # inline, in docs/threat-model.md
    assert "--tls-verify=false" in {fragment for _, fragment in FRAGMENTS}  # docs/registries.md
    assert len(COMMANDS) > 30 and len(FRAGMENTS) > 60
    assert parse("keygen --bogus k") == "No such option: --bogus"
    assert parse("inspect") == "Missing argument 'IMAGE'."
    assert parse("pull --digest") == "Option '--digest' requires an argument."
    assert parse_fragment("push --sign-key") == "push has no --sign-key"
    assert parse_fragment("--no-such-option") == "no command has --no-such-option"
    assert parse_fragment("--keep=yes") == "start: Option '--keep' does not take a value."


@pytest.mark.parametrize(("where", "command"), COMMANDS, ids=[w for w, _ in COMMANDS])
def test_documented_command_is_accepted(where: str, command: str) -> None:
    why = parse(command)
    if command in NOT_YET:
        assert why is not None, (
            f"{where}: `cryptlayer {command}` is accepted now: remove it from NOT_YET"
            f" ({NOT_YET[command]})"
        )
        return
    assert why is None, f"{where}: `cryptlayer {command}` as documented: {why}"


@pytest.mark.parametrize(("where", "fragment"), FRAGMENTS, ids=[w for w, _ in FRAGMENTS])
def test_documented_option_is_taken(where: str, fragment: str) -> None:
    """`--tls-verify=false` in prose is typed too: some command (the one named) takes it."""
    why = parse_fragment(fragment)
    if fragment in NOT_YET:
        assert why is not None, (
            f"{where}: `{fragment}` is accepted now: remove it from NOT_YET ({NOT_YET[fragment]})"
        )
        return
    assert why is None, f"{where}: `{fragment}` as documented: {why}"
