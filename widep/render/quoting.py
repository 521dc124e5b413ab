"""Quoting for every target widep writes, built once, here.

widep's output is executed: ``render --format shell`` scripts and the per-rank ``command.sh`` run on GPU
nodes, ``widep lws`` output is applied to clusters. Every user-supplied string reaches those targets only
through the functions below:

* POSIX shell: :func:`sh_word` quotes every word (flags included: ``--x=$(...)`` is a word like any other),
  :func:`sh_assign` checks the variable name and quotes the value, :func:`sh_ref` expands a checked name,
  :func:`sh_comment` keeps a ``#`` comment on one line.
* Kubernetes ``command`` / ``args`` / ``env[].value``: the kubelet expands ``$(NAME)`` and turns ``$$`` into
  ``$`` before the container sees the text; :func:`k8s_escape` doubles each ``$`` that starts either, so
  the container sees exactly the text widep meant.
* YAML is only ever written by the dumper (``widep.k8s.lws.dump_manifests``); comments in it go through
  :func:`sh_comment` as well (YAML and bash share the ``#``-to-end-of-line rule).

Control characters: :data:`CONTROL` matches what ends or rewrites a line (C0, DEL, C1, Unicode line and
paragraph separators); name-like fields of the topology refuse them (:func:`control_problem`).
"""

from __future__ import annotations

import re
import shlex

CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
"""Characters no name-like field may hold: C0 controls (newline, tab, ESC, NUL), DEL, C1, U+2028/U+2029."""

POSIX_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
"""An environment variable name a POSIX shell can assign and expand."""

_K8S_DOLLAR = re.compile(r"\$(?=[$(])")


class QuotingError(ValueError):
    """A string that cannot be expressed in the target at all (a NUL byte, an invalid variable name)."""


def control_problem(value: str, *, allow: str = "") -> str | None:
    """Why ``value`` is refused as a name-like field (the first control character, escaped), or None."""
    for ch in CONTROL.findall(value):
        if ch not in allow:
            return f"contains the control character {ch!r}; names, paths and flags must be one line of printable text"
    return None


def sh_word(word: str) -> str:
    """One shell word that expands to exactly ``word`` (nothing in it is expanded or executed).

    Plain text is single-quoted (POSIX). A word with control characters (ESC, CR, BEL, DEL, C1, U+2028...) is
    written in bash's ANSI-C quoting, ``$'...'``, with those characters as ``\\xHH`` escapes of their UTF-8
    bytes: the script then holds only printable text, so no terminal, pager or ``click.echo`` (which strips ANSI
    sequences when not writing to a terminal) can change what it starts. Every script widep writes is bash."""
    if "\x00" in word:
        raise QuotingError("a NUL byte cannot be passed in a command line")
    if not CONTROL.search(word):
        return shlex.quote(word)
    out = []
    for ch in word:
        if ch in "\\'":
            out.append("\\" + ch)
        elif CONTROL.match(ch):
            out.append("".join(f"\\x{b:02x}" for b in ch.encode("utf-8")))
        else:
            out.append(ch)
    return "$'" + "".join(out) + "'"


def check_env_name(name: str) -> str:
    if not POSIX_NAME.match(name):
        raise QuotingError(f"{name!r} is not a POSIX environment variable name ([A-Za-z_][A-Za-z0-9_]*)")
    return name


def sh_assign(name: str, value: str) -> str:
    """``NAME='value'`` for ``env`` or a command prefix; the name is checked, the value quoted."""
    return f"{check_env_name(name)}={sh_word(value)}"


def sh_ref(name: str) -> str:
    """``"${NAME}"``: the value of a variable, as one word (the name is checked)."""
    return '"${' + check_env_name(name) + '}"'


def sh_comment(text: str) -> str:
    """``# text`` on one line: control characters (newlines included) shown as escapes, never obeyed."""
    one_line = CONTROL.sub(lambda m: m.group(0).encode("unicode_escape").decode("ascii"), text)
    return f"# {one_line}".rstrip()


def k8s_escape(text: str) -> str:
    """Text for a container's ``command``/``args``/``env[].value`` that the kubelet leaves as written.

    The kubelet replaces ``$(NAME)`` with a variable's value and ``$$`` with ``$``; doubling each ``$``
    that starts either makes its expansion the identity (see ``tests/kubelet.py``).
    """
    return _K8S_DOLLAR.sub("$$", text)
