"""Small helpers over libcst trees, shared by the rule sets.

Rules find nodes with a visitor, then build the edited module with `deep_replace` (identity based,
so everything not touched keeps its exact formatting, comments and line endings). New code is
parsed from text with `parse_statement`/`parse_expression`: its line breaks follow the module's own.
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional, Sequence, Union

import libcst as cst

Block = Union[cst.Module, cst.IndentedBlock]


def dotted(node: cst.CSTNode) -> str:
    """`gr.Chatbot.postprocess` -> "gr.Chatbot.postprocess"; "" for anything that is not a dotted name."""
    if isinstance(node, cst.Name):
        return node.value
    if isinstance(node, cst.Attribute):
        base = dotted(node.value)
        return f"{base}.{node.attr.value}" if base else ""
    return ""


def call_name(call: cst.CSTNode) -> str:
    """The dotted name a call calls ("" when it calls an expression such as a chained call)."""
    return dotted(call.func) if isinstance(call, cst.Call) else ""


def last_attr(call: cst.Call) -> str:
    """The last part of what a call calls: `x.y.from_pretrained(...)` -> "from_pretrained"."""
    if isinstance(call.func, cst.Attribute):
        return call.func.attr.value
    if isinstance(call.func, cst.Name):
        return call.func.value
    return ""


def string_value(node: cst.CSTNode) -> Optional[str]:
    """The value of a plain string literal, else None."""
    if isinstance(node, cst.SimpleString):
        try:
            value = node.evaluated_value
        except Exception:  # noqa: BLE001 - an odd literal is simply not a plain string
            return None
        return value if isinstance(value, str) else None
    return None


def string_literal(value: str, like: Optional[cst.SimpleString] = None) -> cst.SimpleString:
    """A string literal for `value`, quoted like `like` (double quotes by default)."""
    quote = '"'
    if like is not None and like.value[:1] in ("'", '"') and not like.prefix:
        quote = like.value[0]
    body = value.replace("\\", "\\\\").replace(quote, "\\" + quote).replace("\n", "\\n").replace("\r", "\\r")
    return cst.SimpleString(f"{quote}{body}{quote}")


def arg(call: cst.Call, keyword: Optional[str] = None, position: Optional[int] = None) -> Optional[cst.Arg]:
    """The argument given by keyword, else the positional one at `position`."""
    if keyword is not None:
        for a in call.args:
            if a.keyword is not None and a.keyword.value == keyword:
                return a
    if position is not None:
        positional = [a for a in call.args if a.keyword is None and not a.star]
        if position < len(positional):
            return positional[position]
    return None


def keywords(call: cst.Call) -> list[str]:
    return [a.keyword.value for a in call.args if a.keyword is not None]


def add_keyword(call: cst.Call, name: str, value: Union[str, cst.BaseExpression], *,
                after: Optional[str] = None) -> cst.Call:
    """Add `name=value` to a call, after the keyword `after` when present, else last (before **kw).

    The new argument copies the comma (and so the line break and indentation) of its neighbour, so a
    call laid out one argument per line stays that way.
    """
    expr = cst.parse_expression(value) if isinstance(value, str) else value
    args = list(call.args)
    index = len(args)
    for i, a in enumerate(args):
        if a.star == "**":
            index = i
            break
    if after is not None:
        for i, a in enumerate(args):
            if a.keyword is not None and a.keyword.value == after:
                index = i + 1
                break
    new = cst.Arg(value=expr, keyword=cst.Name(name),
                  equal=cst.AssignEqual(whitespace_before=cst.SimpleWhitespace(""),
                                        whitespace_after=cst.SimpleWhitespace("")))
    return call.with_changes(args=insert_list_item(args, index, new))


def insert_list_item(items: Sequence, index: int, new):
    """Insert an Arg/Element/Param into a comma separated sequence keeping its layout."""
    items = list(items)
    comma = cst.Comma(whitespace_after=cst.SimpleWhitespace(" "))
    # copy the nearest comma before the insertion point (it carries the line break of a tall layout)
    for ref in reversed(items[:max(index, 1)]):
        if isinstance(ref.comma, cst.Comma):
            comma = ref.comma
            break
    if index < len(items):
        new = new.with_changes(comma=comma)
    else:
        if items:
            last = items[-1]
            trailing = last.comma
            items[-1] = last.with_changes(comma=comma)
            new = new.with_changes(comma=trailing)
    items.insert(index, new)
    return items


def remove_keyword(call: cst.Call, name: str) -> cst.Call:
    args = [a for a in call.args if not (a.keyword is not None and a.keyword.value == name)]
    if args and args[-1].comma is not cst.MaybeSentinel.DEFAULT and call.args and call.args[-1].keyword is not None \
            and call.args[-1].keyword.value == name:
        args[-1] = args[-1].with_changes(comma=call.args[-1].comma)
    return call.with_changes(args=args)


_FIELDS: dict = {}


def _child_fields(cls) -> tuple:
    names = _FIELDS.get(cls)
    if names is None:
        import dataclasses

        names = _FIELDS[cls] = tuple(f.name for f in dataclasses.fields(cls))
    return names


_NODE_TYPES: dict = {}


def _is_node(cls) -> bool:
    known = _NODE_TYPES.get(cls)
    if known is None:
        known = _NODE_TYPES[cls] = issubclass(cls, cst.CSTNode)
    return known


def walk(tree: cst.CSTNode) -> Iterator[cst.CSTNode]:
    """Every node below `tree` (itself included), in source order; a plain walk, much faster than visit()."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        children = []
        for name in _child_fields(type(node)):
            value = getattr(node, name)
            if type(value) in (list, tuple):
                children.extend(v for v in value if _is_node(type(v)))
            elif _is_node(type(value)):
                children.append(value)
        stack.extend(reversed(children))


def find_all(tree: cst.CSTNode, predicate: Callable[[cst.CSTNode], bool]) -> list:
    """Every node below `tree` (itself included) for which `predicate` holds, in source order."""
    return [n for n in walk(tree) if predicate(n)]


def calls(tree: cst.CSTNode, predicate: Callable[[cst.Call], bool] = lambda c: True) -> list[cst.Call]:
    return find_all(tree, lambda n: isinstance(n, cst.Call) and predicate(n))


def blocks(module: cst.Module) -> Iterator[Block]:
    """The module and every indented block in it: the places statements live."""
    yield module
    yield from find_all(module, lambda n: isinstance(n, cst.IndentedBlock))


def simple_statement(stmt: cst.CSTNode) -> Optional[cst.BaseSmallStatement]:
    """The one small statement of a line such as `x = f()` (None for compound or `a; b` lines)."""
    if isinstance(stmt, cst.SimpleStatementLine) and len(stmt.body) == 1:
        return stmt.body[0]
    return None


def assign_parts(stmt: cst.CSTNode) -> Optional[tuple[str, cst.BaseExpression]]:
    """`name = value` (one plain target) -> (name, value)."""
    small = simple_statement(stmt)
    if isinstance(small, cst.Assign) and len(small.targets) == 1 and isinstance(small.targets[0].target, cst.Name):
        return small.targets[0].target.value, small.value
    return None


def innermost_call(expr: cst.BaseExpression) -> Optional[cst.Call]:
    """`A.from_pretrained(p).half().cuda()` -> the `A.from_pretrained(p)` call at the root of the chain."""
    node = expr
    found = None
    while True:
        if isinstance(node, cst.Call):
            found = node
            func = node.func
            if isinstance(func, cst.Attribute):
                node = func.value
                continue
            return found
        return found


def statement(code: str) -> cst.BaseStatement:
    return cst.parse_statement(code)


def insert_after(module: cst.Module, anchor: cst.CSTNode, new: Sequence[cst.CSTNode]) -> cst.Module:
    return module.deep_replace(anchor, cst.FlattenSentinel([anchor, *new]))


def insert_before(module: cst.Module, anchor: cst.CSTNode, new: Sequence[cst.CSTNode]) -> cst.Module:
    """Insert before `anchor`; the anchor's leading comments and blank lines move above the new lines."""
    first, *rest = new
    first = first.with_changes(leading_lines=anchor.leading_lines)
    moved = anchor.with_changes(leading_lines=())
    return module.deep_replace(anchor, cst.FlattenSentinel([first, *rest, moved]))


def top_imports(module: cst.Module) -> list[cst.SimpleStatementLine]:
    """The import lines at the top of the module (before the first other statement, docstring allowed)."""
    found = []
    for i, stmt in enumerate(module.body):
        small = simple_statement(stmt)
        if isinstance(small, (cst.Import, cst.ImportFrom)):
            found.append(stmt)
        elif i == 0 and isinstance(small, cst.Expr) and isinstance(small.value, (cst.SimpleString, cst.ConcatenatedString)):
            continue
        elif isinstance(stmt, cst.If) or isinstance(stmt, cst.Try):
            continue  # guarded imports
        else:
            break
    return found


def imports_module(module: cst.Module, name: str) -> bool:
    """`import name` or `import name as x` at any level of the file."""
    for node in find_all(module, lambda n: isinstance(n, cst.Import)):
        for alias in node.names:
            if dotted(alias.name) == name:
                return True
    return False


def imports_from(module: cst.Module, mod: str, name: str) -> bool:
    for node in find_all(module, lambda n: isinstance(n, cst.ImportFrom)):
        if node.module is not None and dotted(node.module) == mod and not isinstance(node.names, cst.ImportStar):
            if any(dotted(a.name) == name for a in node.names):
                return True
    return False


def add_import(module: cst.Module, code: str) -> cst.Module:
    """Add an import line after the last import at the top of the file (or first, when there is none)."""
    new = statement(code)
    imports = [s for s in top_imports(module) if "readline" not in code_of(s)]
    if imports:
        return insert_after(module, imports[-1], [new])
    if module.body:
        return insert_before(module, module.body[0], [new])
    return module.with_changes(body=[new])


def function(module: cst.Module, name: str) -> Optional[cst.FunctionDef]:
    found = find_all(module, lambda n: isinstance(n, cst.FunctionDef) and n.name.value == name)
    return found[0] if found else None


def param_names(fn: cst.FunctionDef) -> list[str]:
    return [p.name.value for p in fn.params.params]


def code_of(node: cst.CSTNode) -> str:
    return cst.Module(body=[]).code_for_node(node)


class _Replacer(cst.CSTTransformer):
    def __init__(self, mapping: dict):
        self.mapping = mapping

    def on_leave(self, original_node, updated_node):
        return self.mapping.get(id(original_node), updated_node)


def replace_many(module: cst.Module, pairs: Sequence[tuple]) -> cst.Module:
    """Replace several (old, new) nodes in one pass; the old nodes must not contain each other."""
    if not pairs:
        return module
    return module.visit(_Replacer({id(old): new for old, new in pairs}))
