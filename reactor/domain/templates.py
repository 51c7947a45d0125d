"""Campaign content as Jinja2 templates, rendered in a sandbox that bounds what content can do.

Marketers write the subject, the HTML and text bodies and the SMS body; the reactor renders them
per recipient. Content is untrusted input, so it runs in Jinja2's `ImmutableSandboxedEnvironment`
(no private or internal attributes, no mutation of lists and dicts) with `StrictUndefined`, and
every way a template could make the reactor allocate or compute without bound is capped:

- `range()` holds at most `MAX_RANGE` items; `*`, `**`, `%`, `+` and `~` refuse results past the
  body limit; the filters and string methods that widen text (`center`, `indent`, `join`,
  `replace`, ...) check the size of what they would build before building it; `str.format` is
  refused (the `format` filter is checked instead);
- every loop iteration and every call (a macro's included) spends a step of a per-render budget
  (`MAX_STEPS`), so nested loops and recursive macros stop early;
- output is streamed and cut at the part's limit (`LIMITS`).

`compile_campaign` compiles a campaign's parts once (cached per campaign id and content hash),
checks them statically (syntax, unknown filters and tests, undeclared variables) and with a probe
render, and raises `InvalidCampaign("bad_template", "<part> line <n>: <problem>")`. Rendering one
recipient raises `TemplateRenderError` naming the part, line and problem.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from decimal import Decimal
from types import TracebackType
from typing import Any

from bson import Decimal128, ObjectId
from jinja2 import (
    StrictUndefined,
    TemplateSyntaxError,
    meta,
    nodes,
    pass_eval_context,
)
from jinja2.environment import Template
from jinja2.exceptions import SecurityError
from jinja2.filters import FILTERS
from jinja2.nodes import EvalContext
from jinja2.runtime import markup_join, str_join
from jinja2.sandbox import ImmutableSandboxedEnvironment
from markupsafe import Markup

from .errors import InvalidCampaign
from .html_text import PLACEHOLDER as html_to_text_placeholder
from .html_text import html_to_text, tidy

MAX_RANGE = 10_000  # items a range() may hold
MAX_STEPS = 200_000  # loop iterations + calls per render of one part
MAX_POWER_BITS = 4096  # the largest integer `**` or `*` may build
TEMPLATE_CACHE_SIZE = 512

# The most a rendered part may hold, in characters (bodies are also checked in UTF-8 bytes when
# parsed; a subject is one header line, RFC 5322; an SMS is Twilio's limit for one body).
LIMITS: dict[str, int] = {"subject": 998, "html": 512 * 1024, "text": 512 * 1024, "sms": 1600}
MAX_VALUE = max(LIMITS.values())  # the largest string any expression may build

# The names a template may use. Documented in docs/templates.md.
CONTEXT_NAMES = frozenset(
    {"name", "first_name", "email", "phone", "unsubscribe_url", "customer", "campaign", "channel"}
)


class TemplateLimitError(SecurityError):
    """Raised when a template goes past a limit: output size, range size, steps, a value's size."""


class TemplateRenderError(Exception):
    """Raised when one part of a campaign cannot be rendered for one recipient."""

    def __init__(self, part: str, line: int | None, problem: str, *, refused: bool = False) -> None:
        where = f"{part} line {line}" if line else part
        super().__init__(f"{where}: {problem}")
        self.part = part
        self.line = line
        self.problem = problem
        self.refused = refused  # the sandbox refused it (whatever the customer's data)


# ---- the sandbox -----------------------------------------------------------------------------


class Missing(StrictUndefined):
    """Strict about everything (printing, comparing, iterating a missing value is an error)
    except truth: `{% if customer.city %}` is false when the row has no city."""

    def __bool__(self) -> bool:  # type: ignore[override]  # strict raises; a test is false
        return False


class _Budget(threading.local):
    steps = 0


def _refuse_format(*args: Any, **kwargs: Any) -> Any:
    raise SecurityError("str.format is not available in templates; use the format filter")


_PRINTF = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")


def _check_printf(fmt: str) -> None:
    for match in _PRINTF.finditer(fmt):
        for width in match.groups():
            if width == "*" or (width is not None and int(width) > 999):
                raise TemplateLimitError("%-format widths over 999 are refused")


def _check_size(size: int) -> None:
    if size > MAX_VALUE:
        raise TemplateLimitError(f"a value of {size} characters is past the limit of {MAX_VALUE}")


def _length(value: Any) -> int:
    return len(value) if isinstance(value, str | list | tuple) else len(str(value))


class SandboxEnvironment(ImmutableSandboxedEnvironment):
    """Jinja2's immutable sandbox with the reactor's bounds (see the module docstring)."""

    intercepted_binops = frozenset({"*", "**", "%", "+"})

    def __init__(self, *, autoescape: bool) -> None:
        super().__init__(
            autoescape=autoescape,
            undefined=Missing,
            finalize=_finalize,
            keep_trailing_newline=True,
            auto_reload=False,
            cache_size=0,
        )
        self._budget = _Budget()
        for unbounded in ("lipsum", "namespace"):
            self.globals.pop(unbounded, None)
        self.globals["range"] = self.bounded_range
        self.filters.update(_bounded_filters())
        self.filters["default"] = self.filters["d"] = _default
        self.filters["date"] = _date
        self.filters["_reactor_link"] = _link_suffix

    # Every loop iterates through `bounded_iter` and every `~` goes through `bounded_concat`:
    # the parse tree is rewritten before it is compiled (see `_bound`).
    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        return _bound(super()._parse(source, name, filename))

    def reset_budget(self) -> None:
        self._budget.steps = 0

    def spend(self, steps: int = 1) -> None:
        self._budget.steps += steps
        if self._budget.steps > MAX_STEPS:
            raise TemplateLimitError(f"more than {MAX_STEPS} loop iterations and calls")

    def bounded_range(self, *args: int) -> range:
        rng = range(*args)
        if len(rng) > MAX_RANGE:
            raise TemplateLimitError(
                f"range() of {len(rng)} items is past the limit of {MAX_RANGE}"
            )
        return rng

    def bounded_iter(self, iterable: Iterable[Any]) -> Iterator[Any]:
        for item in iterable:
            self.spend()
            yield item

    @pass_eval_context
    def bounded_concat(self, eval_ctx: EvalContext, *parts: Any) -> str:
        _check_size(sum(_length(p) for p in parts))
        return markup_join(parts) if eval_ctx.autoescape else str_join(parts)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        __self.spend()
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, str):
            args = _check_str_method(owner, getattr(__obj, "__name__", ""), args)
        return super().call(__context, __obj, *args, **kwargs)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**":
            if isinstance(left, int) and isinstance(right, int):
                if right > 0 and max(abs(left), 2).bit_length() * right > MAX_POWER_BITS:
                    raise TemplateLimitError("a power that large is refused")
        elif operator == "*":
            _check_multiply(left, right)
        elif operator == "%" and isinstance(left, str):
            _check_printf(left)
        elif operator == "+" and isinstance(left, str | list | tuple):
            _check_size(_length(left) + _length(right))
        return super().call_binop(context, operator, left, right)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        if super().wrap_str_format(value) is None:
            return None
        return _refuse_format


def _check_multiply(left: Any, right: Any) -> None:
    for seq, n in ((left, right), (right, left)):
        if isinstance(seq, str | list | tuple) and isinstance(n, int):
            _check_size(len(seq) * max(n, 0))
    if isinstance(left, int) and isinstance(right, int):
        if abs(left).bit_length() + abs(right).bit_length() > MAX_POWER_BITS:
            raise TemplateLimitError("a product that large is refused")


_WIDENING = frozenset({"center", "ljust", "rjust", "zfill"})


def _check_str_method(owner: str, method: str, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Check a string method that widens text; returns the arguments to call it with."""
    if method in ("translate", "maketrans"):
        raise SecurityError(f"str.{method} is not available in templates")
    if method in _WIDENING and args and isinstance(args[0], int):
        _check_size(args[0])
    elif method == "expandtabs":
        _check_size(len(owner) * (args[0] if args and isinstance(args[0], int) else 8))
    elif method == "replace" and len(args) >= 2:
        _check_size(len(owner) + owner.count(str(args[0])) * len(str(args[1])))
    elif method == "join" and args:
        items = list(args[0])  # an iterator is read once: the join gets the list
        _check_size(sum(_length(i) for i in items) + len(owner) * len(items))
        return (items, *args[1:])
    return args


def _bound(tree: nodes.Template) -> nodes.Template:
    """Route every loop through `environment.bounded_iter` and every `~` through
    `environment.bounded_concat` (calls, so the sandbox's `call` sees them too)."""
    for loop in tree.find_all(nodes.For):
        loop.iter = nodes.Call(
            nodes.EnvironmentAttribute("bounded_iter"), [loop.iter], [], None, None
        ).set_lineno(loop.lineno)
    for concat in list(tree.find_all(nodes.Concat)):
        call = nodes.Call(
            nodes.EnvironmentAttribute("bounded_concat"), list(concat.nodes), [], None, None
        )
        _replace(tree, concat, call.set_lineno(concat.lineno))
    return tree


def _replace(tree: nodes.Node, old: nodes.Node, new: nodes.Node) -> None:
    for parent in tree.find_all(nodes.Node):
        for field_name in parent.fields:
            value = getattr(parent, field_name, None)
            if value is old:
                setattr(parent, field_name, new)
                return
            if isinstance(value, list):
                for i, item in enumerate(value):
                    if item is old:
                        value[i] = new
                        return


def _bounded_filters() -> dict[str, Callable[..., Any]]:
    """The builtin filters that widen text, each checking what it would build first."""
    center, indent, replace, join, fmt, tojson = (
        FILTERS[n] for n in ("center", "indent", "replace", "join", "format", "tojson")
    )

    def bounded_center(value: Any, width: int = 80) -> str:
        _check_size(width)
        return str(center(value, width))

    def bounded_indent(value: Any, width: int | str = 4, *args: Any, **kwargs: Any) -> str:
        text = str(value)
        pad = width if isinstance(width, int) else len(width)
        _check_size(len(text) + (text.count("\n") + 1) * pad)
        return str(indent(value, width, *args, **kwargs))

    @pass_eval_context
    def bounded_replace(
        eval_ctx: EvalContext, value: Any, old: str, new: str, count: int | None = None
    ) -> str:
        text = str(value)
        _check_size(len(text) + text.count(str(old)) * len(str(new)))
        return str(replace(eval_ctx, value, old, new, count))

    @pass_eval_context
    def bounded_join(eval_ctx: EvalContext, value: Any, d: str = "", attribute: Any = None) -> str:
        items = list(value)
        _check_size(sum(_length(i) for i in items) + len(d) * len(items))
        return str(join(eval_ctx, items, d, attribute))

    def bounded_format(value: Any, *args: Any, **kwargs: Any) -> str:
        _check_printf(str(value))
        return str(fmt(value, *args, **kwargs))

    @pass_eval_context
    def bounded_tojson(eval_ctx: EvalContext, value: Any, indent: int | None = None) -> Markup:
        if indent is not None and not 0 <= indent <= 16:
            raise TemplateLimitError("tojson indents of more than 16 are refused")
        return Markup(tojson(eval_ctx, value, indent))

    return {
        "tojson": bounded_tojson,
        "center": bounded_center,
        "indent": bounded_indent,
        "replace": bounded_replace,
        "join": bounded_join,
        "format": bounded_format,
    }


def _finalize(value: Any) -> Any:
    return "" if value is None else value


def _default(value: Any, default_value: Any = "", boolean: bool = False) -> Any:
    """`default` as marketers expect it: an undefined variable, None and "" all take the
    default (a customer without a name has `name` == "")."""
    if isinstance(value, StrictUndefined) or value is None or value == "":
        return default_value
    if boolean and not value:
        return default_value
    return value


def _link_suffix(value: Any) -> str:
    text = "" if value is None else str(value).strip()
    return f" ({text})" if text.startswith(("http://", "https://")) else ""


def _date(value: Any, fmt: str = "%d %B %Y") -> str:
    if not isinstance(value, dt.date):
        return "" if value is None else str(value)
    _check_printf(fmt)
    return value.strftime(fmt)


# ---- campaigns' templates --------------------------------------------------------------------

HTML_ENV = SandboxEnvironment(autoescape=True)
TEXT_ENV = SandboxEnvironment(autoescape=False)


@dataclass(frozen=True)
class PartTemplate:
    part: str  # subject, html, text or sms
    template: Template
    env: SandboxEnvironment
    source: str = ""  # what it was compiled from

    def render(self, context: Mapping[str, Any]) -> str:
        limit = LIMITS[self.part]
        self.env.reset_budget()
        out: list[str] = []
        size = 0
        try:
            for chunk in self.template.generate(context):
                size += len(chunk)
                if size > limit:
                    raise TemplateLimitError(f"output past the {self.part} limit of {limit}")
                out.append(chunk)
        except TemplateSyntaxError as exc:
            raise TemplateRenderError(self.part, exc.lineno, exc.message or str(exc)) from None
        except RecursionError:
            raise TemplateRenderError(self.part, None, "recursion too deep", refused=True) from None
        except Exception as exc:  # one part for one recipient; whatever the data made it raise
            raise _render_error(self.part, exc) from None
        return "".join(out)


def _render_error(part: str, exc: BaseException) -> TemplateRenderError:
    return TemplateRenderError(
        part,
        _template_line(exc.__traceback__),
        str(exc) or type(exc).__name__,
        refused=isinstance(exc, SecurityError),
    )


def _template_line(tb: TracebackType | None) -> int | None:
    """The template line a render failed on: the last frame Jinja rewrote to the template."""
    line = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


@dataclass(frozen=True)
class LinkSlots:
    """Where a campaign's tracked links are in parts compiled with slots (made by
    reactor/engagement/slots.py): each link the author wrote is `opener + number + CLOSER` in
    what renders, filled per recipient with its tracked URL (or the link as written) before
    the message goes anywhere. Slot n of a part: (destination, the text written there)."""

    opener: str
    html: tuple[tuple[str, str], ...] = ()
    text: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class CampaignTemplates:
    """One campaign's compiled parts. `text_from_html`: the text part is generated from the
    rendered HTML (the campaign gave HTML only); `derived_text`, when set, is a text template
    derived from the HTML source that renders that same text without converting each message.
    `slots`: the HTML and text parts render their tracked links as slots (see LinkSlots)."""

    subject: PartTemplate | None
    html: PartTemplate | None
    text: PartTemplate | None
    sms: PartTemplate | None
    derived_text: PartTemplate | None = None
    slots: LinkSlots | None = None

    @property
    def text_from_html(self) -> bool:
        return self.html is not None and self.text is None


_CACHE: OrderedDict[tuple[str, str], CampaignTemplates] = OrderedDict()
_CACHE_LOCK = threading.Lock()


def campaign_parts(email: Any, sms: Any) -> dict[str, str]:
    """The template sources of a campaign's content, by part name."""
    parts: dict[str, str] = {}
    if email is not None:
        parts["subject"] = email.subject
        if email.html:
            parts["html"] = email.html
        if email.text:
            parts["text"] = email.text
    if sms is not None:
        parts["sms"] = sms.body
    return parts


def compile_campaign(key: str, parts: Mapping[str, str]) -> CampaignTemplates:
    """The compiled parts of campaign `key` (cached per id and content hash); raises
    InvalidCampaign("bad_template", ...) naming the first part that cannot be used."""
    digest = hashlib.sha256(repr(sorted(parts.items())).encode()).hexdigest()
    with _CACHE_LOCK:
        cached = _CACHE.get((key, digest))
        if cached is not None:
            _CACHE.move_to_end((key, digest))
            return cached
    compiled = {part: compile_part(part, source) for part, source in parts.items()}
    html = compiled.get("html")
    templates = CampaignTemplates(
        subject=compiled.get("subject"),
        html=html,
        text=compiled.get("text"),
        sms=compiled.get("sms"),
        derived_text=(
            derive_text_part(parts["html"], html)
            if html is not None and "text" not in compiled
            else None
        ),
    )
    with _CACHE_LOCK:
        _CACHE[(key, digest)] = templates
        while len(_CACHE) > TEMPLATE_CACHE_SIZE:
            _CACHE.popitem(last=False)
    return templates


_EXPRESSION = re.compile(r"\{\{.*?\}\}", re.S)
_SAFE = re.compile(r"\|\s*safe\b")
_LINK_PLACEHOLDER = re.compile(r" \(JXPR(\d{5})QZ\)")


def derive_text_part(html_source: str, html: PartTemplate) -> PartTemplate | None:
    """A text template equivalent to `html_to_text(html.render(context))`, or None.

    Only for HTML made of text and `{{ expressions }}` (no blocks, comments or `safe`): each
    expression is replaced by a placeholder word, the HTML converted once, and the expressions
    put back into the text. Converting each message costs ~0.5 ms; rendering this, microseconds.
    Block tags inside tables would be moved by the HTML parser, so those templates keep the
    per-message conversion; so does any template whose derived text differs from the converted
    probe render (the check that this worked)."""
    if "{%" in html_source or "{#" in html_source or _SAFE.search(html_source):
        return None
    expressions: list[str] = _EXPRESSION.findall(html_source)
    if html_to_text_placeholder.search(html_source):
        return None
    numbered = iter(range(len(expressions)))
    protected = _EXPRESSION.sub(lambda m: f"JXPR{next(numbered):05d}QZ", html_source)
    try:
        text = html_to_text(protected, placeholders=True)
    except Exception:  # the per-message conversion will report it, per recipient
        return None
    if "{" in text:
        return None  # literal braces in the HTML's text would read as template syntax

    def link(m: re.Match[str]) -> str:
        # A link whose whole target is one expression is shown only when it renders to a web
        # address, as the converter does with the rendered HTML.
        inner = expressions[int(m.group(1))][2:-2].strip("-+ \n\t")
        return "{{ (" + inner + ") | _reactor_link }}"

    text = _LINK_PLACEHOLDER.sub(link, text)
    restored = html_to_text_placeholder.sub(lambda m: expressions[int(m.group(1))], text)
    if html_to_text_placeholder.search(restored):
        return None
    try:
        derived = compile_part("text", restored)
        probe = probe_context()
        if tidy(derived.render(probe)) != html_to_text(html.render(probe)):
            return None
    except (InvalidCampaign, TemplateRenderError):
        return None
    return derived


def compile_part(
    part: str, source: str, transform: Callable[[nodes.Template], None] | None = None
) -> PartTemplate:
    """`transform`: changes the parsed template before it is compiled (link slots)."""
    env = HTML_ENV if part == "html" else TEXT_ENV
    try:
        tree = env.parse(source)
    except TemplateSyntaxError as exc:
        raise _invalid(part, exc.lineno, exc.message or "syntax error") from None
    _check_names(part, env, tree)
    if transform is not None:
        transform(tree)
    try:
        template = env.from_string(tree)
    except TemplateSyntaxError as exc:  # an assertion the compiler makes (e.g. a bad filter)
        raise _invalid(part, exc.lineno, exc.message or "syntax error") from None
    compiled = PartTemplate(part, template, env, source)
    try:
        compiled.render(probe_context())
    except TemplateRenderError as exc:
        # A sandbox refusal or a limit no customer's data can avoid. Other failures may depend
        # on a customer's fields (the probe's are empty): they are reported per recipient.
        if exc.refused:
            raise _invalid(part, exc.line, exc.problem) from None
    return compiled


def _check_names(part: str, env: SandboxEnvironment, tree: nodes.Template) -> None:
    for loader in tree.find_all((nodes.Extends, nodes.Include, nodes.Import, nodes.FromImport)):
        raise _invalid(part, loader.lineno, "extends, include and import are not available")
    for node in tree.find_all((nodes.Filter, nodes.Test)):
        table = env.filters if isinstance(node, nodes.Filter) else env.tests
        if node.name not in table:
            kind = "filter" if isinstance(node, nodes.Filter) else "test"
            raise _invalid(part, node.lineno, f"unknown {kind} {node.name!r}")
    unknown = meta.find_undeclared_variables(tree) - CONTEXT_NAMES - set(env.globals)
    if unknown:
        first = min(
            (n for n in tree.find_all(nodes.Name) if n.name in unknown), key=lambda n: n.lineno
        )
        raise _invalid(
            part,
            first.lineno,
            f"unknown variable {first.name!r} (known: {', '.join(sorted(CONTEXT_NAMES))})",
        )


def _invalid(part: str, line: int | None, problem: str) -> InvalidCampaign:
    where = f"{part} line {line}" if line else part
    return InvalidCampaign("bad_template", f"{where}: {problem}")


# ---- the context -----------------------------------------------------------------------------


class _ProbeRow(dict[str, Any]):
    """A customer row for the probe render: every field exists and is empty."""

    def __missing__(self, key: str) -> str:
        return ""


def probe_context() -> dict[str, Any]:
    return render_context(
        name="Ana Example",
        email="ana@example.com",
        phone="+14155550100",
        unsubscribe_url="https://example.com/u/probe",
        row=_ProbeRow(customer_id="probe", name="Ana Example", email="ana@example.com"),
        campaign_name="Probe",
        campaign_id="probe",
        channel="email",
    )


def render_context(
    *,
    name: str,
    email: str,
    phone: str,
    unsubscribe_url: str,
    row: Mapping[str, Any],
    campaign_name: str,
    campaign_id: str,
    channel: str,
) -> dict[str, Any]:
    """The variables a template sees (docs/templates.md lists them)."""
    return {
        "name": name,
        "first_name": name.split()[0] if name.split() else "",
        "email": email,
        "phone": phone,
        "unsubscribe_url": unsubscribe_url,
        "customer": row,
        "campaign": {"name": campaign_name, "id": campaign_id},
        "channel": channel,
    }


def plain_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """An order row as templates see it: BSON types made plain (ObjectId → str,
    Decimal128 → Decimal, naive dates → aware UTC), `_id` left out."""
    return {k: _plain(v) for k, v in row.items() if k != "_id"}


def _plain(value: Any) -> Any:
    if isinstance(value, ObjectId):
        return str(value)
    if isinstance(value, Decimal128):
        return Decimal(str(value.to_decimal()))
    if isinstance(value, dt.datetime) and value.tzinfo is None:
        return value.replace(tzinfo=dt.UTC)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


__all__ = [
    "CONTEXT_NAMES",
    "LIMITS",
    "MAX_RANGE",
    "MAX_STEPS",
    "CampaignTemplates",
    "PartTemplate",
    "TemplateLimitError",
    "TemplateRenderError",
    "campaign_parts",
    "compile_campaign",
    "compile_part",
    "plain_row",
    "probe_context",
    "render_context",
]
