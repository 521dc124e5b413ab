"""The kubelet's ``$(VAR)`` expansion of a container's ``command``, ``args`` and env values, re-implemented for the
tests (``k8s.io/kubernetes`` ``third_party/forked/golang/expansion``): the tests run the generated pod scripts and
check that no value widep writes is changed by the kubelet. widep itself never expands; it escapes
(:func:`widep.render.quoting.k8s_escape`)."""

from __future__ import annotations


def kubelet_expand(text: str, env: dict[str, str]) -> str:
    """Expand ``$(NAME)`` as the kubelet does in ``command``/``args``: defined names are replaced,
    ``$$`` becomes ``$``, anything else (``${X}``, ``$((1+2))``, undefined names) stays as written."""
    out: list[str] = []
    checkpoint = 0
    cursor = 0
    n = len(text)
    while cursor < n:
        if text[cursor] == "$" and cursor + 1 < n:
            out.append(text[checkpoint:cursor])
            nxt = text[cursor + 1]
            advance = 1
            if nxt == "$":
                out.append("$")
            elif nxt == "(":
                close = text.find(")", cursor + 2)
                if close == -1:
                    out.append("$(")
                else:
                    name = text[cursor + 2 : close]
                    out.append(env[name] if name in env else f"$({name})")
                    advance = close - cursor
            else:
                out.append("$" + nxt)
            cursor += advance
            checkpoint = cursor + 1
        cursor += 1
    out.append(text[checkpoint:])
    return "".join(out)
