"""A small declarative option schema: each option is a :class:`Field` with a kind, a default and a description,
from which both the validation and the documentation (Markdown tables, docstrings) come.

traiNNer-redux's idea (one strict, typed, described configuration schema) in plain Python, without a dependency:

* a :class:`Section` is a mapping of fields; it rejects any other key with a "did you mean" hint and the
  list of the keys it accepts (``passthrough`` names keys owned by someone else, e.g. BasicSR's own ``train``
  keys, that are let through unchecked);
* a kind (:class:`Integer`, :class:`Number`, :class:`Boolean`, :class:`OneOf`, :class:`Patterns`, :class:`Text`,
  :class:`TextList`, :class:`Mapping`, :class:`AnyOf` of kinds, or a nested :class:`Section`) checks one value and
  may normalise it;
* a :class:`Rule` checks fields together (combinations) once every field is valid;
* a field may carry old names (``renamed_from``): the old key is accepted, its value used under the new name, and a
  deprecation notice returned for the caller to log.

:meth:`Section.validate` returns the options with every default filled in, or raises :class:`OptionError` naming
the option. Plain Python: no torch, no BasicSR.
"""
import difflib
import textwrap


class OptionError(ValueError):
    """An option is wrong; the message names it."""


class _Required:
    def __repr__(self):
        return 'REQUIRED'


#: The default of a field that must be given.
REQUIRED = _Required()


class Invalid(Exception):
    """Raised by a kind's check: ``expect`` (what the value must be) or ``problem`` (a full sentence about ``key``
    below the checked option)."""

    def __init__(self, expect=None, problem=None, key=None):
        super().__init__(expect or problem)
        self.expect, self.problem, self.key = expect, problem, key


def _yaml_float(x):
    """Plain decimals (``0.5``, ``255.0``); ``!!float 1e-4`` for small values (PyYAML reads ``1e-4`` as text)."""
    if x != 0 and abs(x) < 1e-3:
        mantissa, exponent = f'{x:e}'.split('e')
        return f'!!float {mantissa.rstrip("0").rstrip(".")}e{int(exponent)}'
    text = repr(float(x))
    if 'e' in text or 'inf' in text or 'nan' in text:
        raise ValueError(f'cannot write {x!r} as a plain decimal')
    return text


def yaml_text(value):
    """``value`` as an option file writes it, on one line (``~``, ``true``, ``!!float 1e-4``, ``'off'``,
    ``[1, 2]``, ``{a: 1}``), such that BasicSR's YAML loader reads it back as ``value``."""
    if value is None:
        return '~'
    if isinstance(value, bool):
        return 'true' if value else 'false'
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _yaml_float(value)
    if isinstance(value, (list, tuple)):
        return '[' + ', '.join(yaml_text(x) for x in value) + ']'
    if isinstance(value, dict):
        return '{' + ', '.join(f'{k}: {yaml_text(x)}' for k, x in value.items()) + '}'
    if isinstance(value, str):
        import yaml
        plain = value and value.strip() == value and not any(c in value for c in ':#{}[],&*!|>\'"%@`') \
            and yaml.safe_load(value) == value
        return value if plain else "'" + value.replace("'", "''") + "'"
    raise TypeError(f'cannot write {type(value).__name__}')


def quoted_list(names):
    """``"a", "b" and "c"``."""
    names = [f'"{n}"' for n in names]
    return names[0] if len(names) == 1 else ', '.join(names[:-1]) + ' and ' + names[-1]


def did_you_mean(key, known):
    """``': did you mean "x"?'`` for the closest of ``known``, or ``''``."""
    close = difflib.get_close_matches(str(key), sorted(map(str, known)), n=1, cutoff=0.8)
    return f': did you mean "{close[0]}"?' if close else ''


# ---------------------------------------------------------------------------------------------------------- kinds
class Kind:
    """One kind of value: :meth:`check` returns the (normalised) value or raises :class:`Invalid`; ``doc`` is its
    name in the documentation and ``expect`` what an error message says the value must be."""

    doc = 'value'
    expect = 'a value'

    def check(self, value):
        return value


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class Integer(Kind):
    """An int (not a bool) with an optional lower bound."""

    def __init__(self, minimum=None):
        self.minimum = minimum
        self.doc = 'int' if minimum is None else f'int >= {minimum}'
        self.expect = 'an integer' if minimum is None else f'an integer >= {minimum}'

    def check(self, value):
        if not isinstance(value, int) or isinstance(value, bool) or (self.minimum is not None
                                                                     and value < self.minimum):
            raise Invalid(self.expect)
        return value


class Number(Kind):
    """An int or float (not a bool) in an interval; ``minimum=0, open_min=True`` reads "a positive number"."""

    def __init__(self, minimum=None, maximum=None, open_min=False, open_max=False):
        self.minimum, self.maximum, self.open_min, self.open_max = minimum, maximum, open_min, open_max
        if minimum == 0 and open_min and maximum is None:
            self.doc, self.expect = 'number > 0', 'a positive number'
        elif maximum is None:
            self.doc = f'number >= {minimum}' if minimum is not None else 'number'
            self.expect = f'a number >= {minimum}' if minimum is not None else 'a number'
        else:
            interval = f'{"(" if open_min else "["}{minimum}, {maximum}{")" if open_max else "]"}'
            self.doc, self.expect = f'number in {interval}', f'a number in {interval}'

    def check(self, value):
        if not _is_number(value):
            raise Invalid(self.expect)
        low_ok = self.minimum is None or (value > self.minimum if self.open_min else value >= self.minimum)
        high_ok = self.maximum is None or (value < self.maximum if self.open_max else value <= self.maximum)
        if not (low_ok and high_ok):
            raise Invalid(self.expect)
        return value


class Boolean(Kind):
    doc, expect = 'bool', 'true or false'

    def check(self, value):
        if not isinstance(value, bool):
            raise Invalid(self.expect)
        return value


class OneOf(Kind):
    """One of ``choices`` (compared by value and type: ``true`` is not ``1``); ``aliases`` map other accepted values
    onto choices (YAML reads an unquoted ``off`` as ``false``)."""

    def __init__(self, choices, aliases=None, expect=None, doc=None):
        self.choices, self.aliases = tuple(choices), dict(aliases or {})
        self.expect = expect or f'one of {list(self.choices)}'
        self.doc = doc or ' \\| '.join(f'`{yaml_text(c)}`' for c in self.choices)

    def check(self, value):
        for alias, target in self.aliases.items():
            if value is alias or (type(value) is type(alias) and value == alias):
                return target
        if any(type(value) is type(c) and value == c for c in self.choices):
            return value
        raise Invalid(self.expect)


class Patterns(Kind):
    """A list of strings (glob or ``re:`` patterns on module names)."""

    doc, expect = 'list of patterns', 'a list of glob or "re:" patterns'

    def check(self, value):
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise Invalid(self.expect)
        return list(value)


class Text(Kind):
    """A non-empty string (a path, a name)."""

    def __init__(self, doc='text', expect='a non-empty string'):
        self.doc, self.expect = doc, expect

    def check(self, value):
        if not isinstance(value, str) or not value:
            raise Invalid(self.expect)
        return value


class TextList(Kind):
    """A non-empty list of non-empty strings; a single string is read as a list of one."""

    def __init__(self, doc='list of names', expect='a list of names'):
        self.doc, self.expect = doc, expect

    def check(self, value):
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) and v for v in value):
            raise Invalid(self.expect)
        return list(value)


class Mapping(Kind):
    """A mapping whose keys belong to someone else (an arch's constructor, a loss); ``required`` keys must be
    present; ``check`` (``mapping -> None``, raising :class:`Invalid`) looks further."""

    def __init__(self, required=(), check=None, expect=None, doc='mapping'):
        self.required, self._check, self.doc = tuple(required), check, doc
        self.expect = expect or ('a mapping' + (f' with {quoted_list(required)}' if required else ''))

    def check(self, value):
        if not isinstance(value, dict) or any(k not in value for k in self.required):
            raise Invalid(self.expect)
        if self._check is not None:
            self._check(value)
        return dict(value)


class AnyOf(Kind):
    """The first of ``kinds`` that accepts the value (``None`` stands for the null value)."""

    def __init__(self, *kinds, expect=None, doc=None):
        self.kinds = tuple(_Null() if k is None else k for k in kinds)
        self.expect = expect or ' or '.join(k.expect for k in self.kinds)
        self.doc = doc or ' \\| '.join(k.doc for k in self.kinds)

    def check(self, value):
        for kind in self.kinds:
            try:
                return kind.check(value)
            except Invalid as e:
                if e.problem is not None:  # the value has the kind's shape but is wrong inside: say so
                    raise
        raise Invalid(self.expect)


class _Null(Kind):
    doc, expect = '`~`', 'null'

    def check(self, value):
        if value is not None:
            raise Invalid(self.expect)
        return None


# --------------------------------------------------------------------------------------------- fields and sections
class Field:
    """One option.

    Args:
        name (str): The key.
        kind (Kind): What the value must be.
        default: The value when the key is absent, or :data:`REQUIRED`.
        doc (str): What the option does (Markdown; one paragraph).
        default_doc (str | None): The default as the documentation shows it, where the value alone does not say it
            (e.g. "auto: per bit width"). Default: None.
        renamed_from (tuple[str]): Old names still accepted (with a deprecation notice). Default: ().
        rename_note (str): Appended to that notice. Default: ''.
    """

    def __init__(self, name, kind, default=REQUIRED, doc='', default_doc=None, renamed_from=(), rename_note=''):
        self.name, self.kind, self.default, self.doc = name, kind, default, doc
        self.default_doc, self.renamed_from, self.rename_note = default_doc, tuple(renamed_from), rename_note

    def shown_default(self):
        if self.default_doc is not None:
            return self.default_doc
        return 'required' if self.default is REQUIRED else f'`{yaml_text(self.default)}`'


class Rule:
    """A check of several fields together: ``check(values, label) -> message | None`` with the validated values
    (defaults filled in) and ``label(key)``, the option's name as messages write it; ``doc`` documents it."""

    def __init__(self, doc, check):
        self.doc, self.check = doc, check


class Section(Kind):
    """A strict mapping of :class:`Field` s (itself a kind, so sections nest): any other key is an error, except
    the ``passthrough`` ones.

    Args:
        fields (list[Field]): The options, in documentation order.
        rules (list[Rule]): Combinations checked after the fields. Default: ().
        passthrough (Iterable[str]): Keys owned by someone else, let through unchecked. Default: ().
        passthrough_doc (str): Whose they are, for messages ("accepts only BasicSR's keys and ..."). Default:
            'other'.
        owner (str | None): Who reads the section, for messages ("Quantized accepts only ..."). Default: None.
        coerce (dict | None): Whole values standing for a mapping (``true`` -> ``{}``, ``false`` -> None): a
            section whose value may be None is optional. Default: None.
        doc (str): Name of the kind in the documentation. Default: 'mapping'.
    """

    def __init__(self, fields, rules=(), passthrough=(), passthrough_doc='other', owner=None, coerce=None,
                 doc='mapping'):
        self.fields = {f.name: f for f in fields}
        self.rules, self.passthrough = tuple(rules), frozenset(passthrough)
        self.passthrough_doc = passthrough_doc
        self.owner, self.coerce, self.doc = owner, dict(coerce or {}), doc
        self.old_names = {old: f for f in fields for old in f.renamed_from}
        self.nullable = None in self.coerce.values()
        shapes = ['a mapping'] + [yaml_text(k) for k in self.coerce if k is not None]
        self.expect = ', '.join(shapes) + (' or null' if self.nullable else '')

    def keys(self):
        """Every key the section knows: fields, their old names and the passthrough keys."""
        return set(self.fields) | set(self.old_names) | set(self.passthrough)

    # -- validation
    def validate(self, values, where=None, notices=None):
        """Validate ``values`` (a mapping) and return it with every field's default filled in.

        Args:
            values (dict | None): The options; None counts as empty.
            where (str | None): The section's place in the option file, for messages: ``'train'`` writes
                ``option "train.key" must be ...``; None writes ``key must be ...`` (the arguments of a function,
                e.g. ``Quantized``). Default: None.
            notices (list | None): Deprecation and other notices are appended here (for the caller to log).

        Raises:
            OptionError: naming the option and what it must be.
        """
        return self._validate({} if values is None else values, _Where(where, ()), notices)

    def _validate(self, values, where, notices):
        if notices is None:
            notices = []
        for raw, target in self.coerce.items():
            if values is raw or (type(values) is type(raw) and values == raw):
                values = target
                break
        if values is None and self.nullable:
            return None
        if not isinstance(values, dict):
            raise OptionError(where.must(self.expect, values))
        values = dict(values)
        for old, f in self.old_names.items():
            if old in values:
                old_label, new_label = where.child(old).label(), where.child(f.name).label(bare=True)
                if f.name in values:
                    raise OptionError(f'{old_label} is the old name of {new_label}: give only the new one')
                values[f.name] = values.pop(old)
                notices.append(f'{old_label} is deprecated: it is now {new_label}, and its value is used as '
                               f'such{f.rename_note}. Rename it in the option file.')
        accepted = set(self.fields) | set(self.passthrough)
        for key in values:
            if key not in accepted:
                raise OptionError(self.unknown_message(key, where))
        out = {k: v for k, v in values.items() if k not in self.fields}
        for name, f in self.fields.items():
            sub = where.child(name)
            if name not in values and f.default is REQUIRED:
                raise OptionError(f'{sub.label()} is missing')
            value = values.get(name, f.default)
            try:
                out[name] = (f.kind._validate(value, sub, notices) if isinstance(f.kind, Section)
                             else f.kind.check(value) if name in values else value)
            except Invalid as e:
                if e.problem is not None:
                    raise OptionError(f'{sub.child(e.key).label() if e.key else sub.label()}: {e.problem}') from None
                raise OptionError(sub.must(e.expect, value)) from None
        for rule in self.rules:
            message = rule.check(out, lambda key, _w=where: _w.child(key).label())
            if message:
                raise OptionError(message)
        return out

    def unknown_message(self, key, where):
        """``unknown option "x": did you mean "y"? <owner> accepts only ...``."""
        hint = did_you_mean(key, self.keys())
        owner = self.owner or where.label(bare=True)
        own = quoted_list(list(self.fields))
        tail = f'{owner} accepts only ' + (f'{self.passthrough_doc} keys and {own}' if self.passthrough else own)
        return f'unknown option {where.child(key).label(bare=True)}{hint or ""}{"" if hint else ":"} {tail}'

    # -- documentation
    def rows(self, prefix=''):
        """``(key, type, default, description)`` per field, nested sections' fields after their own row."""
        for f in self.fields.values():
            key = f'{prefix}{f.name}'
            yield key, f.kind.doc, f.shown_default(), f.doc
            if isinstance(f.kind, Section):
                yield from f.kind.rows(f'{key}.')

    def all_rules(self):
        """The rules of this section and of the nested ones."""
        yield from self.rules
        for f in self.fields.values():
            if isinstance(f.kind, Section):
                yield from f.kind.all_rules()

    def markdown(self, prefix=''):
        """The section as a Markdown table (key, type, default, description), its rules listed below it."""
        lines = ['| option | type | default | description |', '|---|---|---|---|']
        for key, kind, default, doc in self.rows(prefix):
            lines.append(f'| `{key}` | {kind} | {default} | {_cell(doc)} |')
        rules = [r.doc for r in self.all_rules()]
        if rules:
            lines += ['', 'Checked together:'] + [f'- {doc}' for doc in rules]
        return '\n'.join(lines)

    def args_doc(self, indent='    ', width=112):
        """The fields as the ``Args:`` section of a Google-style docstring (Markdown marks removed)."""
        lines = ['Args:']
        for key, kind, default, doc in self.rows():
            text = f'{key} ({kind}): {" ".join(doc.split())} Default: {default or "see below"}.'
            text = text.replace('`', '').replace('\\|', '|')
            lines += textwrap.wrap(text, width, initial_indent=indent, subsequent_indent=indent * 2)
        return '\n'.join(lines)


def _cell(text):
    return ' '.join(text.split()).replace('|', '\\|')


class _Where:
    """Where a value sits, for messages: the root (``train`` or None) and the keys below it."""

    def __init__(self, root, keys):
        self.root, self.keys = root, tuple(keys)

    def child(self, key):
        return _Where(self.root, self.keys + (key,))

    def label(self, key=None, bare=False):
        """``option "train.a.b"`` below a root, ``a.b`` for arguments; ``bare`` quotes without "option"."""
        keys = self.keys + ((key,) if key is not None else ())
        path = '.'.join(str(k) for k in ((self.root,) if self.root else ()) + keys)
        if bare:
            return f'"{path}"'
        return f'option "{path}"' if self.root else path

    def must(self, expect, value):
        return f'{self.label()} must be {expect}, got {value!r}'
