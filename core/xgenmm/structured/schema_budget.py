"""Bound a JSON schema so that any value the grammar allows fits a token budget (`max_tokens`).

Grammar-constrained decoding guarantees the *shape* of an output, not that it ends: a weak model can write a string
or a number forever and be cut by `max_tokens`, leaving invalid JSON. `bound_json_schema` adds the missing limits
(`maxLength` on strings, digit bounds on integers, bounded decimals on numbers, `maxItems` on arrays,
`additionalProperties: false` on objects that list their properties) so that the longest value the grammar accepts
is at most `max_tokens` tokens. Every value of the bounded schema is valid for the original schema (only limits are
added), so the output stays schema-valid. Limits the schema already sets are kept (tightened, never loosened).

Cost model (worst case, so the bound is a guarantee): every token emits at least one byte, JSON is compact (no
whitespace; `json.dumps` separators count as 2 bytes), a string character is at most 4 bytes (UTF-8; escapes are
limited to the two-byte ones), a number costs its characters. Values the schema fixes (enum / const / booleans /
null) cost their longest spelling. Parts we cannot bound (free-form objects, strings with a `pattern` or `format`,
recursive `$ref`s) are left as they are and reported in `BoundedSchema.unbounded`.

Bounded work: a schema comes from a request, so bounding it must cost what its size costs. Each `$ref` target is
costed once and reused (a DAG of references that expands exponentially stays linear), the nodes visited per pass
are capped (`MAX_SCHEMA_NODES`) and so is the length of `$ref` chains (`MAX_REF_DEPTH`); beyond either the schema is
refused with `SchemaTooComplexError`. Array sizes are clamped (`MAX_ARRAY_ITEMS`) and costs saturate, so absurd
`minItems` / `maxItems` cannot overflow a float.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import Any

from ..errors import SchemaTooComplexError

__all__ = ["BoundedSchema", "bound_json_schema", "BOUNDED_JSON_OPTIONS", "smallest_json_budget", "MAX_SCHEMA_NODES",
           "MAX_REF_DEPTH"]

MAX_SCHEMA_NODES = 20_000  # schema nodes visited per pass, `$ref`s followed (a large real schema has a few hundred)
MAX_REF_DEPTH = 64  # `$ref`s followed inside each other
MAX_ARRAY_ITEMS = 2**31 - 1  # larger minItems / maxItems are treated as this
_SATURATED = 10**300  # costs stop growing here (still far over any budget; converts to a float)

# llguidance options that make the cost model hold: compact separators, only two-byte escapes.
BOUNDED_JSON_OPTIONS: dict[str, Any] = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
    "json_allowed_escapes": '"\\bfnrt',
}
SEPARATOR_BYTES = 2  # ", " and ": "
BYTES_PER_CHAR = 4
MAX_INTEGER_DIGITS = 15
MAX_DECIMALS = 6
NUMBER_BYTES = 1 + MAX_INTEGER_DIGITS  # sign + digits (a number: sign + int digits + "." + decimals fits too)


@dataclass
class BoundedSchema:
    """The bounded schema, the per-leaf token allowance it used, and the JSON pointers left unbounded."""

    schema: dict[str, Any]
    leaf_tokens: int
    unbounded: list[str] = field(default_factory=list)


@dataclass
class _Cost:
    fixed: int = 0  # bytes independent of the allowance (keys, punctuation, enums)
    leaves: float = 0.0  # open string leaves (each gets the allowance), weighted by array repetition
    numbers: float = 0.0  # open number / integer leaves (each gets min(allowance, NUMBER_BYTES))

    def total(self, allowance: int) -> float:
        return min(self.fixed, _SATURATED) + self.leaves * allowance + self.numbers * min(allowance, NUMBER_BYTES)


class _Bounder:
    def __init__(self, root: dict[str, Any], max_array_items: int) -> None:
        self.root = root
        self.defs = root.get("$defs") or root.get("definitions") or {}
        self.max_array_items = max_array_items
        self.unbounded: list[str] = []
        self.visits = 0
        self.recursion_cuts = 0  # how many recursive refs were cut so far (a cost that saw none can be reused)
        self.ref_costs: dict[str, _Cost] = {}
        self.applied_refs: set[str] = set()

    def visit(self, stack: tuple[str, ...]) -> None:
        self.visits += 1
        if self.visits > MAX_SCHEMA_NODES:
            raise SchemaTooComplexError(f"the JSON schema has more than {MAX_SCHEMA_NODES} nodes once its $refs are "
                                        "followed; simplify it")
        if len(stack) > MAX_REF_DEPTH:
            raise SchemaTooComplexError(f"the JSON schema follows $refs more than {MAX_REF_DEPTH} deep")

    def resolve(self, node: dict[str, Any], stack: tuple[str, ...]) -> tuple[dict[str, Any] | None, tuple[str, ...]]:
        ref = node.get("$ref")
        if not isinstance(ref, str):
            return node, stack
        if ref in stack:
            self.recursion_cuts += 1
            return None, stack  # recursive
        for prefix in ("#/$defs/", "#/definitions/"):
            if ref.startswith(prefix):
                target = self.defs.get(ref[len(prefix):])
                if isinstance(target, dict):
                    return target, stack + (ref,)
        return None, stack

    # ---- pass 1: cost ----------------------------------------------------------------------------------------
    def cost(self, node: Any, stack: tuple[str, ...] = ()) -> _Cost:
        self.visit(stack)
        if not isinstance(node, dict):
            return _Cost(fixed=8)  # `true` / `{}` schema: treat as a small value
        ref = node.get("$ref")
        if isinstance(ref, str) and ref in self.ref_costs:
            return copy.copy(self.ref_costs[ref])
        cuts = self.recursion_cuts
        target, inner_stack = self.resolve(node, stack)
        if target is None:
            return _Cost(leaves=1)
        if target is node:
            return self._cost_of_node(node, stack)
        cost = self._cost_of_node(target, inner_stack)
        if self.recursion_cuts == cuts:  # nothing below was cut for recursion: the same wherever it is used
            self.ref_costs[ref] = copy.copy(cost)
        return cost

    def _cost_of_node(self, node: dict[str, Any], stack: tuple[str, ...]) -> _Cost:
        if "const" in node:
            return _Cost(fixed=len(json.dumps(node["const"], ensure_ascii=False).encode()))
        if isinstance(node.get("enum"), list) and node["enum"]:
            return _Cost(fixed=max(len(json.dumps(v, ensure_ascii=False).encode()) for v in node["enum"]))
        for key in ("anyOf", "oneOf"):
            if isinstance(node.get(key), list) and node[key]:
                costs = [self.cost(sub, stack) for sub in node[key]]
                return _Cost(fixed=max(c.fixed for c in costs), leaves=max(c.leaves for c in costs),
                             numbers=max(c.numbers for c in costs))
        types = _types(node)
        best = _Cost()
        for kind in types or ["string"]:
            c = self._cost_of_type(node, kind, stack)
            if c.total(64) > best.total(64):
                best = c
        return best

    def _cost_of_type(self, node: dict[str, Any], kind: str, stack: tuple[str, ...]) -> _Cost:
        if kind in ("boolean", "null"):
            return _Cost(fixed=5)
        if kind == "string":
            return _Cost(leaves=1)
        if kind in ("integer", "number"):
            return _Cost(numbers=1)
        if kind == "array":
            items = node.get("items", {})
            n = self._array_cap(node)
            inner = self.cost(items, stack)
            return _Cost(fixed=min(2 + n * (inner.fixed + SEPARATOR_BYTES), _SATURATED), leaves=n * inner.leaves,
                         numbers=n * inner.numbers)
        if kind == "object":
            props = node.get("properties")
            if not isinstance(props, dict):
                return _Cost(fixed=2)
            total = _Cost(fixed=2)
            for name, sub in props.items():
                inner = self.cost(sub, stack)
                total.fixed = min(total.fixed + len(json.dumps(name, ensure_ascii=False).encode())
                                  + 2 * SEPARATOR_BYTES + inner.fixed, _SATURATED)
                total.leaves += inner.leaves
                total.numbers += inner.numbers
            return total
        return _Cost(fixed=8)

    def _array_cap(self, node: dict[str, Any]) -> int:
        existing = node.get("maxItems")
        minimum = node.get("minItems", 0) if isinstance(node.get("minItems"), int) else 0
        cap = existing if isinstance(existing, int) else max(self.max_array_items, minimum)
        return min(max(cap, 0), MAX_ARRAY_ITEMS)

    # ---- pass 2: apply ---------------------------------------------------------------------------------------
    def apply(self, node: Any, allowance: int, path: str = "#", stack: tuple[str, ...] = ()) -> None:
        self.visit(stack)
        if not isinstance(node, dict):
            return
        ref = node.get("$ref")
        if isinstance(ref, str):
            if ref in self.applied_refs and ref not in stack:
                return  # its target (one shared dict) is bounded already, with this same allowance
            target, new_stack = self.resolve(node, stack)
            if target is not None:
                self.applied_refs.add(ref)
            if target is None:
                self.unbounded.append(path)
            else:
                self.apply(target, allowance, ref, new_stack)
            return
        if "const" in node or isinstance(node.get("enum"), list):
            return
        for key in ("anyOf", "oneOf", "allOf"):
            if isinstance(node.get(key), list):
                for i, sub in enumerate(node[key]):
                    self.apply(sub, allowance, f"{path}/{key}/{i}", stack)
        types = _types(node)
        if not types:
            if not any(k in node for k in ("anyOf", "oneOf", "allOf")):
                self.unbounded.append(path)  # any JSON value
            return
        if "string" in types:
            self._bound_string(node, allowance, path)
        if "integer" in types:
            self._bound_integer(node, allowance)
        elif "number" in types:
            self._bound_number(node, allowance)
        if "array" in types:
            node["maxItems"] = self._array_cap(node)
            if "items" in node:
                self.apply(node["items"], allowance, f"{path}/items", stack)
            else:
                self.unbounded.append(f"{path}/items")
        if "object" in types:
            props = node.get("properties")
            if isinstance(props, dict):
                node.setdefault("additionalProperties", False)
                for name, sub in props.items():
                    self.apply(sub, allowance, f"{path}/properties/{name}", stack)
                extra = node.get("additionalProperties")
                if extra not in (False, None):
                    self.unbounded.append(f"{path}/additionalProperties")
            else:
                self.unbounded.append(path)

    def _bound_string(self, node: dict[str, Any], allowance: int, path: str) -> None:
        if "pattern" in node or "format" in node:
            self.unbounded.append(path)
            return
        cap = max((allowance - 2) // BYTES_PER_CHAR, 0)
        minimum = node.get("minLength", 0) if isinstance(node.get("minLength"), int) else 0
        cap = max(cap, minimum)
        existing = node.get("maxLength")
        node["maxLength"] = min(existing, cap) if isinstance(existing, int) else cap

    def _bound_integer(self, node: dict[str, Any], allowance: int) -> None:
        allowance = min(allowance, NUMBER_BYTES)
        digits = max(1, min(MAX_INTEGER_DIGITS, allowance - 1))
        limit = 10**digits - 1
        self._tighten(node, -limit, limit)

    def _bound_number(self, node: dict[str, Any], allowance: int) -> None:
        # sign + integer digits + "." + decimals
        allowance = min(allowance, NUMBER_BYTES)
        room = max(allowance - 2, 2)
        int_digits = max(1, min(MAX_INTEGER_DIGITS, room // 2))
        decimals = max(0, min(MAX_DECIMALS, room - int_digits))
        self._tighten(node, -(10**int_digits - 1), 10**int_digits - 1)
        if "multipleOf" not in node:
            node["multipleOf"] = 1 if decimals == 0 else float(f"1e-{decimals}")

    @staticmethod
    def _tighten(node: dict[str, Any], low: float, high: float) -> None:
        """Intersect the node's range with [low, high]; an existing range that lies outside it is left alone."""
        new_low = low if not isinstance(node.get("minimum"), (int, float)) else max(node["minimum"], low)
        new_high = high if not isinstance(node.get("maximum"), (int, float)) else min(node["maximum"], high)
        for key, pick in (("exclusiveMinimum", max), ("exclusiveMaximum", min)):
            value = node.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                if key == "exclusiveMinimum":
                    new_low = pick(new_low, value)
                else:
                    new_high = pick(new_high, value)
        if new_low > new_high:
            return
        node["minimum"], node["maximum"] = new_low, new_high


def _types(node: dict[str, Any]) -> list[str]:
    kind = node.get("type")
    if isinstance(kind, str):
        return [kind]
    if isinstance(kind, list):
        return [k for k in kind if isinstance(k, str)]
    if "properties" in node:
        return ["object"]
    if "items" in node:
        return ["array"]
    return []


def _largest_allowance(cost: _Cost, budget: int) -> int:
    """The largest per-leaf byte allowance with cost.total(allowance) <= budget (0 if none)."""
    if not cost.leaves and not cost.numbers:
        return budget
    low, high = 0, max(budget, 0)
    while low < high:
        mid = (low + high + 1) // 2
        if cost.total(mid) <= budget:
            low = mid
        else:
            high = mid - 1
    return low


def bound_json_schema(
    schema: dict[str, Any],
    max_tokens: int,
    *,
    reserve_tokens: int = 1,
    max_array_items: int | None = None,
    x_guidance: bool = True,
) -> BoundedSchema:
    """A copy of `schema` whose longest accepted (compact) JSON value fits `max_tokens - reserve_tokens` tokens.

    `reserve_tokens` covers text around the value (e.g. tags) and the end-of-turn token. With `x_guidance` the llguidance
    options of the cost model (`BOUNDED_JSON_OPTIONS`) are set on the schema's root. Raises `SchemaTooComplexError`
    for a schema whose bounding would cost more than its size (see the module docstring).
    """
    if _too_many_nodes(schema):  # before copying it: a refused schema costs one cheap count
        raise SchemaTooComplexError(f"the JSON schema has more than {MAX_SCHEMA_NODES} nodes; simplify it")
    try:
        return _bound(schema, max_tokens, reserve_tokens, max_array_items, x_guidance)
    except RecursionError:
        raise SchemaTooComplexError("the JSON schema nests too deeply to be bounded") from None


def _too_many_nodes(schema: Any) -> bool:
    """More than MAX_SCHEMA_NODES objects and arrays, counted iteratively (before any `$ref` is followed)."""
    count, stack = 0, [schema]
    while stack:
        node = stack.pop()
        count += 1
        if count > MAX_SCHEMA_NODES:
            return True
        children = node.values() if isinstance(node, dict) else node
        stack.extend(c for c in children if isinstance(c, (dict, list)))
    return False


def _bound(schema: dict[str, Any], max_tokens: int, reserve_tokens: int, max_array_items: int | None,
           x_guidance: bool) -> BoundedSchema:
    out = copy.deepcopy(dict(schema))
    if max_array_items is None:  # scale with the budget: 2 items at 100 tokens, 8 at 512, 16 from 1024
        max_array_items = max(2, min(16, max_tokens // 64))
    bounder = _Bounder(out, max_array_items)
    cost = bounder.cost(out)
    budget = max(max_tokens - reserve_tokens, 0)
    allowance = _largest_allowance(cost, budget)
    if allowance < 3 and max_array_items > 1:
        # Not even three bytes a leaf: fewer array items may help; otherwise the budget is simply too small.
        return _bound(schema, max_tokens, reserve_tokens, max(1, max_array_items // 2), x_guidance)
    allowance = max(allowance, 3)
    bounder.apply(out, allowance)
    if x_guidance:
        options = dict(out.get("x-guidance") or {})
        for key, value in BOUNDED_JSON_OPTIONS.items():
            options.setdefault(key, value)
        out["x-guidance"] = options
    return BoundedSchema(out, allowance, sorted(set(bounder.unbounded)))


def smallest_json_budget(schema: dict[str, Any]) -> int:
    """The fewest tokens (bytes, worst case) the longest value of `bound_json_schema(schema, n)` can take at its
    smallest allowance (3 bytes a leaf, one array item): below this no bound guarantees that the value fits."""
    bounder = _Bounder(copy.deepcopy(dict(schema)), 1)
    return int(bounder.cost(bounder.root).total(3))
