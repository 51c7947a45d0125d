"""What the emulator teaches mongomock's query and expression engine: operators and system
variables mongod has and mongomock lacks or gets slow.

- `$in`/`$nin` answered from a set (mongomock compares against every element of the list);
- `$$NOW` and `$$CLUSTER_TIME`, fixed per command as mongod fixes them;
- the `$type` and `$mergeObjects` expressions;
- date arithmetic in `$add` and `$subtract`.

Each `install_*` function patches mongomock's module state once (they are idempotent).
"""

from __future__ import annotations

import datetime as dt
import random
import re
from typing import Any

import mongomock
import mongomock.aggregate
import mongomock.collection
from bson import MaxKey, MinKey, Regex
from mongomock import filtering

from .values import bson_type

_mongomock_in = filtering._in_op
NOTHING: Any = vars(filtering)["NOTHING"]  # mongomock's "field absent" marker
_in_cache: list[Any] = [None, 0, None]  # the last $in list seen, its length, its value set


def _in_set(search_val: list[Any] | tuple[Any, ...]) -> frozenset[Any] | None:
    """The values of a long `$in` list as a set, prepared once per query (mongomock rescans
    the whole list for every document, which makes a 1,000-id match quadratic). None when
    the list holds something a set cannot answer for: regexes, documents or arrays."""
    if _in_cache[0] is search_val and _in_cache[1] == len(search_val):
        cached: frozenset[Any] | None = _in_cache[2]
        return cached
    values: frozenset[Any] | None = None
    if not any(isinstance(v, filtering._RE_TYPES) for v in search_val):
        try:
            values = frozenset(search_val)
        except TypeError:  # unhashable members (documents, arrays)
            values = None
    # Holding the list keeps its id from being reused by another one while it is cached.
    _in_cache[:] = [search_val, len(search_val), values]
    return values


def _fast_in(doc_val: Any, search_val: Any) -> bool:
    """mongomock's `$in` with the same answers, in O(1) per document for long plain lists."""
    if not isinstance(search_val, (list, tuple)) or len(search_val) < 16:
        return bool(_mongomock_in(doc_val, search_val))
    values = _in_set(search_val)
    if values is None:
        return bool(_mongomock_in(doc_val, search_val))
    if doc_val is NOTHING:
        return None in values
    for x in doc_val if isinstance(doc_val, (list, tuple)) else (doc_val,):
        try:
            if x in values:
                return True
        except TypeError:  # an unhashable document value: compare it the slow way
            if x in search_val:
                return True
    return False


# $$NOW and $$CLUSTER_TIME of the command being executed (mongod fixes both for a whole
# command). mongomock knows only $$ROOT and $$CURRENT; `install_expressions` teaches its
# expression parser the other two (and the expressions it lacks).
SYSTEM_VARIABLES: dict[str, Any] = {}
# The command's `let` variables ($$name), fixed for the whole command like the system ones.
LET_VARIABLES: dict[str, Any] = {}


def install_expressions() -> None:
    """Teach mongomock's expressions what mongod has and it lacks (idempotent)."""
    _install_now()
    _install_type()
    _install_extra_expressions()
    _install_date_arithmetic()
    _install_operator_only_projection()
    _install_query_types()
    _install_update_pipeline()
    _install_storage_rules()
    _install_missing_comparisons()


def _rand(parser: Any, args: Any) -> Any:
    """$rand: a double in [0, 1), new for each evaluation."""
    if args != {}:
        raise mongomock.OperationFailure("$rand does not take any arguments", code=3040501)
    return random.random()


_COMPARISONS = {
    "$eq": lambda c: c == 0,
    "$ne": lambda c: c != 0,
    "$lt": lambda c: c < 0,
    "$lte": lambda c: c <= 0,
    "$gt": lambda c: c > 0,
    "$gte": lambda c: c >= 0,
}


def _install_missing_comparisons() -> None:
    """Comparison expressions with a missing field, as mongod evaluates them: missing sorts
    before every value, null included, and equals only missing (mongomock raised KeyError)."""
    parser: Any = mongomock.aggregate._Parser
    if getattr(parser, "_reactor_missing_comparisons", False):
        return
    compare = parser._handle_comparison_operator

    def handle_comparison(self: Any, operator: str, values: Any) -> Any:
        if operator not in _COMPARISONS or not isinstance(values, list) or len(values) != 2:
            return compare(self, operator, values)
        sides = []
        for value in values:
            try:
                sides.append((1, self.parse(value)))
            except KeyError:
                sides.append((0, None))  # missing
        (a_present, a), (b_present, b) = sides
        if a_present and b_present:
            return compare(self, operator, [{"$literal": a}, {"$literal": b}])
        return _COMPARISONS[operator](a_present - b_present)

    parser._handle_comparison_operator = handle_comparison
    parser._reactor_missing_comparisons = True


def _install_storage_rules() -> None:
    """Field names as mongod 5.0+ stores them: `$`-prefixed and dotted names are allowed in
    inserted and replacing documents (mongomock refused a top-level `$` name); the null
    character still is not."""
    collection_module: Any = mongomock.collection
    if getattr(collection_module, "_reactor_storage_rules", False):
        return
    collection_module._validate_data_fields = collection_module._recursive_key_check_null_character
    collection_module._reactor_storage_rules = True


def _install_update_pipeline() -> None:
    """Pipeline updates as mongod applies them: `$replaceWith` (mongomock knows only
    `$replaceRoot`), and the document keeps its `_id` when the new root has none."""
    collection: Any = mongomock.collection.Collection
    if getattr(collection, "_reactor_update_pipeline", False):
        return

    def apply_update_pipeline(self: Any, existing: Any, pipeline: Any, session: Any) -> None:
        stages = [
            {"$replaceRoot": {"newRoot": stage["$replaceWith"]}}
            if isinstance(stage, dict) and "$replaceWith" in stage
            else stage
            for stage in pipeline
        ]
        [new_document] = mongomock.aggregate.process_pipeline(
            [existing], self.database, stages, session
        )
        if "_id" in existing and "_id" not in new_document:
            new_document = {"_id": existing["_id"], **new_document}
        existing.clear()
        existing.update(new_document)

    collection._apply_update_pipeline = apply_update_pipeline
    collection._reactor_update_pipeline = True


_EXTRA: dict[str, Any] = {}  # operator -> handler(parser, arguments), filled below


def _install_extra_expressions() -> None:
    """Expressions mongomock lacks ($rand, $getField, $setField, $unsetField, $mergeObjects),
    dispatched from one wrapper around its parser, so each parse pays one dictionary lookup."""
    parser: Any = mongomock.aggregate._Parser
    if getattr(parser, "_reactor_extra_expressions", False):
        return
    if "$mergeObjects" in mongomock.aggregate.object_operators:
        mongomock.aggregate.object_operators.remove("$mergeObjects")
    _EXTRA.update(
        {
            "$rand": _rand,
            "$getField": lambda p, a: _field_expression(p, "$getField", a),
            "$setField": lambda p, a: _field_expression(p, "$setField", a),
            "$unsetField": lambda p, a: _field_expression(p, "$unsetField", a),
            "$mergeObjects": _merge_objects,
        }
    )
    parse = parser.parse

    def parse_extra(self: Any, expression: Any) -> Any:
        if type(expression) is list:
            # An array literal: each element is an expression (mongod evaluates `["$a", {...}]`;
            # mongomock returned it as written), a missing value becoming null.
            return [_element(self, e) for e in expression]
        if type(expression) is dict and len(expression) == 1:
            operator = next(iter(expression))
            handler = _EXTRA.get(operator)
            if handler is not None:
                return handler(self, expression[operator])
        return parse(self, expression)

    parser.parse = parse_extra
    parser._reactor_extra_expressions = True


def _element(parser: Any, expression: Any) -> Any:
    try:
        return parser.parse(expression)
    except KeyError:
        return None


def _field_expression(parser: Any, operator: str, args: Any) -> Any:
    if operator == "$getField" and not isinstance(args, dict):
        args = {"field": args, "input": "$$CURRENT"}
    if not isinstance(args, dict) or "field" not in args:
        raise mongomock.OperationFailure(
            f"{operator} requires 'field' to be specified", code=4161102
        )
    field = parser.parse(args["field"])
    if not isinstance(field, str):
        raise mongomock.OperationFailure(
            f"{operator} requires 'field' to evaluate to type String", code=4161106
        )
    source = args.get("input", "$$CURRENT")
    try:
        value = parser.parse(source)
    except KeyError:
        value = None
    if operator == "$getField":
        if not isinstance(value, dict):
            return None
        if field not in value:
            raise KeyError(field)  # missing, as a missing field path is
        return value[field]
    if value is None:
        return None
    if not isinstance(value, dict):
        raise mongomock.OperationFailure(
            f"{operator} requires 'input' to evaluate to type Object", code=4161105
        )
    out = dict(value)
    if operator == "$unsetField":
        out.pop(field, None)
        return out
    if "value" not in args:
        raise mongomock.OperationFailure("$setField requires 'value' to be specified", code=4161103)
    new_value = args["value"]
    if new_value == "$$REMOVE":
        out.pop(field, None)
        return out
    try:
        out[field] = parser.parse(new_value)
    except KeyError:
        out.pop(field, None)  # a missing value removes the field
    return out


def _install_query_types() -> None:
    """The query operator `$type` for the types mongomock leaves unimplemented (null, regex,
    timestamp, minKey, maxKey…), and `int`/`long` told apart as mongod stores them."""
    type_map: Any = filtering.TYPE_MAP
    if type_map.get("_reactor_types"):
        return
    for name in ("null", "regex", "timestamp", "minKey", "maxKey", "int", "long"):
        type_map[name] = (lambda wanted: lambda value: _query_type(value) == wanted)(name)
    type_map["_reactor_types"] = None  # a marker; never a valid $type alias


def _query_type(value: Any) -> str:
    if isinstance(value, re.Pattern | Regex):
        return "regex"
    if isinstance(value, MinKey):
        return "minKey"
    if isinstance(value, MaxKey):
        return "maxKey"
    return bson_type(value)


def _install_operator_only_projection() -> None:
    """A projection of only `$slice` (or `$elemMatch`) fields keeps every other field, as mongod
    does (`{list: {$slice: [5, 10]}}` returns the whole document with a part of `list`);
    mongomock returned the `_id` alone."""
    collection: Any = mongomock.collection.Collection
    if getattr(collection, "_reactor_operator_projection", False):
        return
    original = collection._copy_only_fields

    def copy_only_fields(self: Any, doc: Any, fields: Any, container: Any) -> Any:
        if (
            isinstance(fields, dict)
            and fields
            and all(
                isinstance(v, dict) and len(v) == 1 and next(iter(v)) in ("$slice", "$elemMatch")
                for k, v in fields.items()
                if k != "_id"
            )
            and any(k != "_id" for k in fields)
        ):
            sliced = original(self, doc, dict(fields), container)
            out = container()
            for key, value in doc.items():  # the stored order, as mongod returns it
                if key in sliced:
                    out[key] = sliced[key]
                elif key not in fields:
                    out[key] = mongomock.collection._copy_field(value, container)
            return out
        return original(self, doc, fields, container)

    collection._copy_only_fields = copy_only_fields
    collection._reactor_operator_projection = True


def _install_now() -> None:
    """`$$NOW` and `$$CLUSTER_TIME` in aggregation, `$expr` and pipeline updates."""
    parser: Any = mongomock.aggregate._Parser
    if getattr(parser, "_reactor_system_variables", False):
        return
    original = parser._parse_basic_expression

    def parse_basic_expression(self: Any, expression: Any) -> Any:
        if isinstance(expression, str) and expression.startswith("$$"):
            name, _, rest = expression[2:].partition(".")
            if name not in self._user_vars:
                for scope in (SYSTEM_VARIABLES, LET_VARIABLES):
                    if name in scope:
                        if rest:
                            return mongomock.helpers.get_value_by_dot(scope[name], rest)
                        return scope[name]
        return original(self, expression)

    parser._parse_basic_expression = parse_basic_expression
    parser._reactor_system_variables = True


def _install_type() -> None:
    """$type (an aggregation expression since MongoDB 3.4)."""
    parser: Any = mongomock.aggregate._Parser
    if "$type" not in mongomock.aggregate.type_operators:
        mongomock.aggregate.type_operators.append("$type")
        handle_type = parser._handle_type_operator

        def handle_type_operator(self: Any, operator: str, values: Any) -> Any:
            if operator != "$type":
                return handle_type(self, operator, values)
            argument = values[0] if isinstance(values, list) and len(values) == 1 else values
            try:
                value = self.parse(argument)
            except KeyError:
                return "missing"
            return bson_type(value)

        parser._handle_type_operator = handle_type_operator


def _merge_objects(parser: Any, arguments: Any) -> Any:
    """$mergeObjects as an expression (mongomock has it only as a $group accumulator)."""
    if not isinstance(arguments, list):
        arguments = [arguments]
    merged: dict[str, Any] = {}
    for argument in arguments:
        try:
            value = parser.parse(argument)
        except KeyError:
            continue  # missing: ignored, as null is
        if value is None:
            continue
        if not isinstance(value, dict):
            raise mongomock.OperationFailure(
                f"$mergeObjects requires object inputs, but input {value!r} is of "
                f"type {bson_type(value)}",
                code=40400,
            )
        merged.update(value)
    return merged


def _install_date_arithmetic() -> None:
    """Dates in $add and $subtract: date + ms -> date, date - date -> ms (a long),
    date - ms -> date. mongomock's arithmetic accepts numbers only."""
    parser: Any = mongomock.aggregate._Parser
    if not getattr(parser, "_reactor_date_arithmetic", False):
        arithmetic = parser._handle_arithmetic_operator

        def handle_arithmetic(self: Any, operator: str, values: Any) -> Any:
            if operator in ("$add", "$subtract") and isinstance(values, list):
                try:
                    parsed = [self.parse(v) for v in values]
                except KeyError:
                    return None
                if any(isinstance(v, dt.datetime) for v in parsed):
                    return _date_arithmetic(operator, parsed)
            return arithmetic(self, operator, values)

        parser._handle_arithmetic_operator = handle_arithmetic
        parser._reactor_date_arithmetic = True


def _date_arithmetic(operator: str, values: list[Any]) -> Any:
    if any(v is None for v in values):
        return None
    if operator == "$add":
        dates = [v for v in values if isinstance(v, dt.datetime)]
        if len(dates) != 1:
            raise mongomock.OperationFailure(
                "only one date allowed in an $add expression", code=16612
            )
        ms = sum(v for v in values if not isinstance(v, dt.datetime))
        return _round_ms(dates[0] + dt.timedelta(milliseconds=ms))
    if len(values) != 2:
        raise mongomock.OperationFailure(
            "Expression $subtract takes exactly 2 arguments.", code=16020
        )
    a, b = values
    if isinstance(a, dt.datetime) and isinstance(b, dt.datetime):
        return int((a - b) / dt.timedelta(milliseconds=1))
    if isinstance(a, dt.datetime) and isinstance(b, int | float):
        return _round_ms(a - dt.timedelta(milliseconds=b))
    raise mongomock.OperationFailure(
        f"can't $subtract {bson_type(b)} from {bson_type(a)}", code=16556
    )


def _round_ms(value: dt.datetime) -> dt.datetime:
    return value.replace(microsecond=value.microsecond // 1000 * 1000)


def install_fast_operators() -> None:
    """Swap mongomock's `$in`/`$nin` matchers for the set-based ones (idempotent)."""
    operators = filtering._filterer_inst._operator_map
    operators["$in"] = _fast_in
    operators["$nin"] = lambda dv, sv: not _fast_in(dv, sv)
