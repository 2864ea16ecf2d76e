"""Tests of graphslim.pipeline: registry, option typing, pipeline text, TOML, pass manager, plugins.

The real IR is not needed: ``FakeGraph`` stands in, with a ``verify()`` that can be made to fail.
Every pass registered here is named ``test-*`` and the registry is restored after each test.
"""

from __future__ import annotations

import importlib.metadata
import json
import sys
import textwrap
import types
import typing
from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from graphslim.errors import OptionError, PassError, PipelineError, VerificationError
from graphslim.pipeline import (
    REGISTRY,
    PassInstrument,
    PassManager,
    PassResult,
    PassSpec,
    Pipeline,
    get_pass,
    load_builtin_passes,
    load_entry_point_plugins,
    load_pipeline_config,
    load_plugin,
    parse_pipeline,
    parse_pipeline_config,
    register_pass,
    registered_passes,
    unregister_pass,
)
from graphslim.pipeline.messages import ordinal

# --------------------------------------------------------------------------------------------------
# Fixtures: registry isolation, test passes, a stand-in graph
# --------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def isolated_registry():
    """Restore the registry and plugin caches after each test (built-ins loaded once, first)."""
    load_builtin_passes()
    saved = REGISTRY.snapshot()
    yield
    REGISTRY.restore(saved)


@dataclass(frozen=True)
class PruneOptions:
    ratio: float = field(default=0.5, metadata={"help": "fraction of channels removed per group"})
    criterion: str = field(
        default="l1", metadata={"help": "importance criterion", "choices": ("l1", "l2", "bn")}
    )
    keep: tuple[int, ...] = field(default=(), metadata={"help": "class indices to keep"})
    layer: tuple[str, ...] = field(default=(), metadata={"help": "layers to prune"})
    calib: str | None = field(default=None, metadata={"help": "calibration data file"})


@dataclass(frozen=True)
class SubsetOptions:
    keep: tuple[int, ...] = field(metadata={"help": "class indices to keep"})
    background: bool = field(default=False, metadata={"help": "keep class 0 as background"})
    labels: tuple[str, ...] = field(default=(), metadata={"help": "new labels"})
    labels_file: str | None = field(default=None, metadata={"help": "labels file to remap"})


@dataclass(frozen=True)
class AllTypesOptions:
    count: int = 1
    scale: float = 1.0
    flag: bool = False
    word: str = "a"
    limit: Optional[int] = None  # noqa: UP007 - typing.Optional must work too
    maybe_ratio: float | None = None
    ints: tuple[int, ...] = ()
    floats: tuple[float, ...] = ()
    words: tuple[str, ...] = ()
    maybe_ints: tuple[int, ...] | None = None
    mode: Literal["fast", "exact"] = "fast"
    modes: tuple[str, ...] = field(default=(), metadata={"choices": ("x", "y")})


@dataclass(frozen=True)
class CheckedOptions:
    ratio: float = 0.5

    def __post_init__(self):
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"ratio must be in [0, 1), got {self.ratio}")


class FakeGraph:
    """Stand-in for graphslim.ir.Graph: records what ran, verify() fails when told to."""

    def __init__(self):
        self.log: list[str] = []
        self.broken = False

    def verify(self):
        self.log.append("verify")
        if self.broken:
            raise VerificationError("node 'conv2d_1' reads missing tensor 'x:0'")

    @property
    def verify_calls(self) -> int:
        return self.log.count("verify")


@pytest.fixture
def test_passes():
    """Register the test passes used across this file."""

    @register_pass("test-prune", options=PruneOptions)
    def prune(graph, opts):
        """Prune channels (test). Second sentence."""
        graph.log.append(f"prune:{opts.ratio}")
        return PassResult(changed=True, stats={"removed_channels": 12})

    @register_pass("test-subset", options=SubsetOptions)
    def subset(graph, opts):
        """Keep a subset of classes (test)."""
        graph.log.append(f"subset:{','.join(map(str, opts.keep))}")
        return PassResult(changed=True, stats={"kept": len(opts.keep)})

    @register_pass("test-noop")
    def noop(graph, options):
        """Do nothing (test)."""
        assert options is None
        graph.log.append("noop")
        return PassResult(changed=False)

    @register_pass("test-types", options=AllTypesOptions, help="every option type")
    def all_types(graph, opts):
        return PassResult(changed=False)

    @register_pass("test-checked", options=CheckedOptions)
    def checked(graph, opts):
        return PassResult(changed=False)

    @register_pass("test-fail")
    def fail(graph, options):
        graph.log.append("fail")
        raise PassError("op 'Foo' at node 'foo_1' has no channel rule")

    @register_pass("test-crash")
    def crash(graph, options):
        return {}["missing"]

    @register_pass("test-break")
    def breaker(graph, options):
        """Break the graph (test)."""
        graph.log.append("break")
        graph.broken = True
        return PassResult(changed=True)

    @register_pass("test-none")
    def returns_none(graph, options):
        graph.log.append("none")

    return registered_passes()


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------


def test_register_pass_records_name_help_and_typed_options(test_passes):
    info = get_pass("test-prune")
    assert info.name == "test-prune"
    assert info.options_cls is PruneOptions
    assert info.help == "Prune channels (test). Second sentence."
    assert [o.name for o in info.options] == ["ratio", "criterion", "keep", "layer", "calib"]
    ratio = info.option("ratio")
    assert (ratio.base, ratio.default, ratio.required) == (float, 0.5, False)
    assert ratio.describe() == "ratio (float, default 0.5): fraction of channels removed per group"
    assert info.option("criterion").choices == ("l1", "l2", "bn")
    assert info.option("criterion").type_name == "l1|l2|bn"
    assert info.option("keep").type_name == "list of int"
    assert info.option("calib").type_name == "string or none"
    assert get_pass("test-subset").option("keep").required
    assert get_pass("test-types").help == "every option type"
    assert get_pass("test-noop").options == ()
    assert info.option("nope") is None


def test_string_annotations_are_resolved(test_passes):
    # this module uses `from __future__ import annotations`: every annotation is a string
    assert isinstance(AllTypesOptions.__dataclass_fields__["limit"].type, str)
    options = {o.name: o for o in get_pass("test-types").options}
    assert (options["count"].base, options["count"].is_list) == (int, False)
    assert (options["limit"].base, options["limit"].optional) == (int, True)
    assert (options["maybe_ratio"].base, options["maybe_ratio"].optional) == (float, True)
    assert (options["floats"].base, options["floats"].is_list) == (float, True)
    assert (options["maybe_ints"].is_list, options["maybe_ints"].optional) == (True, True)
    assert options["mode"].choices == ("fast", "exact")
    assert options["modes"].type_name == "list of x|y"


def test_registered_passes_is_sorted_and_includes_builtins(test_passes):
    names = list(registered_passes())
    assert names == sorted(names)
    assert {"test-prune", "test-subset", "test-noop"} <= set(names)


def test_duplicate_registration_is_an_error_naming_both_definitions(test_passes):
    with pytest.raises(PipelineError) as err:

        @register_pass("test-prune")
        def other(graph, options):
            return PassResult(False)

    message = str(err.value)
    assert "pass 'test-prune' is already registered" in message
    assert "prune" in message and "other" in message and "replace=True" in message


def test_replace_true_overrides_a_registration(test_passes):
    @register_pass("test-prune", replace=True)
    def replacement(graph, options):
        return PassResult(False)

    assert get_pass("test-prune").fn is replacement


def test_reregistering_the_same_definition_is_allowed(test_passes):
    # what importlib.reload does: a new function object with the same module and qualname
    original = get_pass("test-noop").fn
    clone = types.FunctionType(original.__code__, original.__globals__, original.__name__)
    clone.__qualname__ = original.__qualname__
    register_pass("test-noop")(clone)
    assert get_pass("test-noop").fn is clone


def test_unregister_pass(test_passes):
    assert unregister_pass("test-noop").name == "test-noop"
    with pytest.raises(PipelineError, match="unknown pass 'test-noop'"):
        get_pass("test-noop")


def _register(name, options=None, fn=None):
    def default(graph, options):
        return PassResult(False)

    return register_pass(name, options=options)(fn or default)


@dataclass(frozen=True)
class ListOptions:
    items: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class BadDefaultOptions:
    calib: str = None  # should be `str | None`


@dataclass(frozen=True)
class NameOptions:
    name: str = "x"


@dataclass(frozen=True)
class BadChoicesOptions:
    level: int = field(default=1, metadata={"choices": ("one", "two")})


@dataclass(frozen=True)
class UnresolvableOptions:
    thing: NoSuchType = None  # noqa: F821 - unresolvable on purpose


class NotADataclass:
    ratio: float = 0.5


@pytest.mark.parametrize(
    "name, options, fragment",
    [
        ("test bad", None, "invalid pass name 'test bad'"),
        ("1test", None, "invalid pass name '1test'"),
        ("test-x", NotADataclass, "must be a dataclass type"),
        ("test-x", ListOptions, "option 'items' of pass 'test-x' has unsupported type"),
        ("test-x", BadDefaultOptions, "the default of option 'calib' of pass 'test-x'"),
        ("test-x", NameOptions, "option called 'name', which is reserved"),
        ("test-x", BadChoicesOptions, "choice 'one' of option 'level' of pass 'test-x' is not an int"),
        ("test-x", UnresolvableOptions, "cannot resolve the option types of pass 'test-x'"),
    ],
)
def test_bad_declarations_fail_at_registration(name, options, fragment):
    with pytest.raises(PipelineError) as err:
        _register(name, options)
    assert fragment in str(err.value)
    assert "test-x" not in REGISTRY


def test_pass_function_must_take_graph_and_options():
    def one_argument(graph):
        return PassResult(False)

    with pytest.raises(PipelineError, match=r"must accept two arguments \(graph, options\)"):
        _register("test-x", fn=one_argument)


def test_unknown_pass_lists_every_registered_pass_and_suggests(test_passes):
    with pytest.raises(PipelineError) as err:
        get_pass("test-prnue")
    message = str(err.value)
    assert message.startswith("unknown pass 'test-prnue'; did you mean 'test-prune'?")
    for name in registered_passes():
        assert name in message


def test_unknown_pass_without_close_match_still_lists_passes(test_passes):
    with pytest.raises(PipelineError) as err:
        get_pass("zzzzzz")
    assert "unknown pass 'zzzzzz'. Registered passes: " in str(err.value)
    assert "did you mean" not in str(err.value)


# --------------------------------------------------------------------------------------------------
# Pipeline text: round trips
# --------------------------------------------------------------------------------------------------

CANONICAL = [
    "",
    "test-noop",
    "test-subset{keep=3,7,12 background=true},test-prune{ratio=0.5 criterion=l1},test-noop",
    "test-prune{criterion=bn ratio=0.25}",
    "test-prune{keep=}",
    "test-prune{calib=none}",
    'test-prune{calib="none"}',
    'test-prune{calib="my calib.npz"}',
    'test-subset{keep=1 labels="a b",c,"" labels_file="labels, v2 {final}.txt"}',
    'test-subset{keep=1 labels="quote \\" backslash \\\\ newline \\n tab \\t"}',
    "test-types{count=-3 scale=1e-05 flag=false word=true limit=none maybe_ratio=2.5}",
    "test-types{ints=1,2 floats=0.1,2.0,inf words=x,y.z maybe_ints=none mode=exact modes=y,x}",
    "test-types{word=C:/data/file.txt maybe_ints=}",
    "test-prune{ratio=0.5},test-prune{ratio=0.75}",
]


@pytest.mark.parametrize("text", CANONICAL)
def test_canonical_text_round_trips(test_passes, text):
    pipeline = parse_pipeline(text)
    assert str(pipeline) == text
    assert parse_pipeline(str(pipeline)) == pipeline


@pytest.mark.parametrize(
    "text, canonical",
    [
        ("  ", ""),
        (" test-noop , test-noop ", "test-noop,test-noop"),
        ("test-prune { ratio=0.5   criterion=l2 }", "test-prune{ratio=0.5 criterion=l2}"),
        ("test-prune{}", "test-prune"),
        ("test-subset{keep=3, 7 ,12}", "test-subset{keep=3,7,12}"),
        ("test-subset{keep=1\n background=yes},\ntest-noop", "test-subset{keep=1 background=true},test-noop"),
        ("test-types{flag=1 scale=2 limit=None}", "test-types{flag=true scale=2.0 limit=none}"),
        ("test-types{flag=NO}", "test-types{flag=false}"),
        ('test-types{word="plain" words="a","b"}', "test-types{word=plain words=a,b}"),
        ("test-types{scale=1e-5 floats=1,.5}", "test-types{scale=1e-05 floats=1.0,0.5}"),
        ("test-types{word=a\\b}", 'test-types{word="a\\\\b"}'),
        ("test-types{word=NONE}", 'test-types{word="NONE"}'),
    ],
)
def test_non_canonical_text_prints_canonically(test_passes, text, canonical):
    pipeline = parse_pipeline(text)
    assert str(pipeline) == canonical
    assert parse_pipeline(str(pipeline)) == pipeline


def test_parsed_values_are_typed(test_passes):
    (subset, prune, noop) = parse_pipeline(
        'test-subset{keep=3,7,12 background=true labels_file="my labels.txt"},'
        "test-prune{ratio=1 calib=none},test-noop"
    )
    assert subset == PassSpec(
        "test-subset", {"keep": (3, 7, 12), "background": True, "labels_file": "my labels.txt"}
    )
    assert prune.options == {"ratio": 1.0, "calib": None}
    assert isinstance(prune.options["ratio"], float)
    assert noop == PassSpec("test-noop")
    assert list(prune.options) == ["ratio", "calib"]  # order as given


def test_options_print_in_the_order_given(test_passes):
    assert str(parse_pipeline("test-prune{criterion=l2 ratio=0.1}")) == "test-prune{criterion=l2 ratio=0.1}"
    assert parse_pipeline("test-prune{criterion=l2 ratio=0.1}") == parse_pipeline(
        "test-prune{ratio=0.1 criterion=l2}"
    )


@pytest.mark.parametrize("word", ["true", "True", "YES", "1"])
def test_bool_true_spellings(test_passes, word):
    assert parse_pipeline(f"test-types{{flag={word}}}")[0].options["flag"] is True


@pytest.mark.parametrize("word", ["false", "False", "no", "0"])
def test_bool_false_spellings(test_passes, word):
    assert parse_pipeline(f"test-types{{flag={word}}}")[0].options["flag"] is False


def test_none_and_quoted_none(test_passes):
    assert parse_pipeline("test-prune{calib=none}")[0].options["calib"] is None
    assert parse_pipeline('test-prune{calib="none"}')[0].options["calib"] == "none"
    assert parse_pipeline("test-types{word=none}")[0].options["word"] == "none"  # not optional
    assert parse_pipeline("test-types{maybe_ints=none}")[0].options["maybe_ints"] is None
    assert parse_pipeline("test-types{maybe_ints=}")[0].options["maybe_ints"] == ()


def test_pipeline_is_an_immutable_sequence(test_passes):
    pipeline = parse_pipeline("test-subset{keep=1},test-prune,test-noop")
    assert len(pipeline) == 3
    assert [spec.name for spec in pipeline] == ["test-subset", "test-prune", "test-noop"]
    assert pipeline[1:] == parse_pipeline("test-prune,test-noop")
    assert pipeline[-1] == PassSpec("test-noop")
    assert repr(pipeline) == "Pipeline('test-subset{keep=1},test-prune,test-noop')"
    assert hash(pipeline) == hash(parse_pipeline(str(pipeline)))
    with pytest.raises(PipelineError, match="holds PassSpec objects"):
        Pipeline(["test-noop"])


def test_passspec_of_validates_and_normalises(test_passes):
    spec = PassSpec.of("test-subset", keep=[3, 7], background=True)
    assert spec.options == {"keep": (3, 7), "background": True}
    assert str(spec) == "test-subset{keep=3,7 background=true}"
    assert PassSpec.of("test-prune", ratio=1).options == {"ratio": 1.0}
    assert PassSpec.of("test-prune", keep=5).options == {"keep": (5,)}
    assert spec.build_options() == SubsetOptions(keep=(3, 7), background=True)
    assert PassSpec.of("test-prune").build_options() == PruneOptions()
    assert PassSpec.of("test-noop").build_options() is None
    assert spec.info is get_pass("test-subset")
    with pytest.raises(OptionError, match="option 'ratio' of pass 'test-prune' expects a float"):
        PassSpec.of("test-prune", ratio="half")
    with pytest.raises(OptionError, match="option 'flag' of pass 'test-types' expects a bool"):
        PassSpec.of("test-types", flag=1)


# --------------------------------------------------------------------------------------------------
# Pipeline text: errors
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("test-subset{keep=3", "unbalanced '{' at column 12"),
        ("test-p{ratio=1", "unbalanced '{' at column 7"),
        ("test-noop}", "unbalanced '}' at column 10"),
        ("test-prune{ratio=0.5}}", "unbalanced '}' at column 22"),
        ("test-noop,", "expected a pass name after ',' at column 10"),
        (",test-noop", "expected a pass name before ',' at column 1"),
        ("test-noop,,test-noop", "expected a pass name before ',' at column 11"),
        ("{ratio=1}", "expected a pass name before '{' at column 1"),
        ("test-noop test-noop", "expected ',' or the end after pass 'test-noop', got 't' at column 11"),
        ("test-prune{ratio=1}{calib=x}", "second option block for pass 'test-prune' at column 20"),
        ("test-prune{ratio = 0.5}", "expected '=' after option name 'ratio' at column 17"),
        ("test-prune{ratio}", "expected '=' after option name 'ratio' at column 17"),
        ("test-prune{=1}", "missing option name before '=' at column 12"),
        ("test-prune{,}", "unexpected ',' at column 12"),
        ("test-prune{keep=,1}", "missing value before ',' at column 17"),
        ("test-prune{keep=1,}", "missing value after ',' at column 18"),
        ("test-prune{keep=1, ratio=0.5}", "missing value after ',' (found option 'ratio') at column 18"),
        ("test-prune{calib={x}}", "unexpected '{' in a value at column 18"),
        ("test-prune{calib=a=b}", "unexpected '=' inside a value at column 19"),
        ('test-prune{calib=a"b"}', "unexpected quote inside a value at column 19"),
        ('test-prune{calib="abc}', "unterminated string at column 18"),
        ('test-prune{calib="a\\qb"}', "unknown escape '\\q' at column 20"),
        ("test-prune{ratio=1 @}", "expected '=' after option name '@' at column 21"),
        ("test-prune{ratio=1 \"x\"=1}", "expected an option name, got '\"' at column 20"),
        ("test@prune", "expected ',' or the end after pass 'test', got '@' at column 5"),
        ("test-noop,\n  test-noop{", "unbalanced '{' at line 2, column 12"),
    ],
)
def test_syntax_errors_give_the_position(test_passes, text, fragment):
    with pytest.raises(PipelineError) as err:
        parse_pipeline(text)
    assert fragment in str(err.value)
    assert "of pipeline '" in str(err.value)


def test_syntax_error_in_a_long_pipeline_shows_an_excerpt(test_passes):
    text = ",".join(["test-prune{ratio=0.5}"] * 10) + ",test-prune{ratio=0.5"
    with pytest.raises(PipelineError) as err:
        parse_pipeline(text)
    message = str(err.value)
    assert f"unbalanced '{{' at column {len(text) - 9}" in message
    assert "of pipeline '..." in message and len(message) < 200


def test_unknown_pass_in_text_names_the_position_and_lists_passes(test_passes):
    with pytest.raises(PipelineError) as err:
        parse_pipeline("test-noop,test-prun{ratio=0.5}")
    message = str(err.value)
    assert "unknown pass 'test-prun' (at column 11); did you mean 'test-prune'?" in message
    for name in registered_passes():
        assert name in message


def test_unknown_option_lists_valid_options_with_types_and_help(test_passes):
    with pytest.raises(OptionError) as err:
        parse_pipeline("test-prune{ratoi=0.5}")
    message = str(err.value)
    assert message.startswith(
        "pass 'test-prune' (at column 12) has no option 'ratoi'; did you mean 'ratio'? Valid options: "
    )
    assert "ratio (float, default 0.5): fraction of channels removed per group" in message
    assert "criterion (l1|l2|bn, default l1): importance criterion" in message
    assert "keep (list of int, default empty): class indices to keep" in message
    assert "layer (list of string, default empty): layers to prune" in message
    assert "calib (string or none, default none): calibration data file" in message


def test_option_on_a_pass_without_options(test_passes):
    with pytest.raises(OptionError) as err:
        parse_pipeline("test-noop{ratio=1}")
    assert "pass 'test-noop' (at column 11) takes no options, but was given 'ratio'" in str(err.value)


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("test-prune{ratio=half}", "option 'ratio' of pass 'test-prune' (at column 12) expects a float, got 'half'"),
        ("test-types{count=1.5}", "option 'count' of pass 'test-types' (at column 12) expects an int, got '1.5'"),
        ("test-types{flag=maybe}", "option 'flag' of pass 'test-types' (at column 12) expects a bool (true/false, yes/no, 1/0), got 'maybe'"),
        ("test-prune{criterion=l11}", "option 'criterion' of pass 'test-prune' (at column 12) expects one of l1, l2, bn, got 'l11'; did you mean l1?"),
        ("test-types{modes=x,z}", "option 'modes' of pass 'test-types' (at column 12) expects a list of values from x, y, got 'z'"),
        ("test-prune{keep=1,x,3}", "option 'keep' of pass 'test-prune' (at column 12) expects a list of ints, got 'x'"),
        ("test-types{limit=lots}", "option 'limit' of pass 'test-types' (at column 12) expects an int or none, got 'lots'"),
        ("test-prune{calib=a,b}", "expects a string or none, got a list a,b; quote it to include commas"),
        ("test-prune{ratio=}", "option 'ratio' of pass 'test-prune' (at column 12) expects a float, got nothing"),
        ("test-prune{ratio=none}", "expects a float, got 'none'"),
    ],
)
def test_bad_values_name_pass_option_value_and_expected_type(test_passes, text, fragment):
    with pytest.raises(OptionError) as err:
        parse_pipeline(text)
    assert fragment in str(err.value)


def test_bad_value_message_includes_the_option_help(test_passes):
    with pytest.raises(OptionError) as err:
        parse_pipeline("test-prune{ratio=half}")
    assert str(err.value).endswith("(ratio: fraction of channels removed per group)")


def test_missing_required_option(test_passes):
    with pytest.raises(OptionError) as err:
        parse_pipeline("test-noop,test-subset{background=true}")
    message = str(err.value)
    assert "pass 'test-subset' (at column 11) requires option 'keep' (list of int: class indices to keep)" in message
    assert "test-subset{keep=...}" in message
    assert "background (bool, default false): keep class 0 as background" in message


def test_duplicate_option(test_passes):
    with pytest.raises(OptionError, match="option 'ratio' of pass 'test-prune' .* is given twice"):
        parse_pipeline("test-prune{ratio=0.1 ratio=0.2}")


def test_options_dataclass_post_init_validation_becomes_an_option_error(test_passes):
    with pytest.raises(OptionError) as err:
        parse_pipeline("test-checked{ratio=1.5}")
    message = str(err.value)
    assert "invalid options for pass 'test-checked' (at column 1) in 'test-checked{ratio=1.5}'" in message
    assert "ValueError: ratio must be in [0, 1), got 1.5" in message
    assert isinstance(err.value.__cause__, ValueError)


def test_non_text_pipeline_is_rejected():
    with pytest.raises(PipelineError, match="a pipeline must be text, got list"):
        parse_pipeline(["dce"])


# --------------------------------------------------------------------------------------------------
# TOML config
# --------------------------------------------------------------------------------------------------

CONFIG = """
# slim the digits classifier
[[pass]]
name = "test-subset"
keep = [3, 7, 12]
background = true
labels_file = "my labels.txt"

[[pass]]
name = "test-prune"
ratio = 0.5
criterion = "l2"

[[pass]]
name = "test-noop"
"""


def test_toml_config_equals_the_text_pipeline(test_passes, tmp_path):
    path = tmp_path / "slim.toml"
    path.write_text(CONFIG)
    expected = parse_pipeline(
        'test-subset{keep=3,7,12 background=true labels_file="my labels.txt"},'
        "test-prune{ratio=0.5 criterion=l2},test-noop"
    )
    assert load_pipeline_config(path) == expected
    assert str(load_pipeline_config(str(path))) == str(expected)


def test_toml_pipeline_string_key(test_passes, tmp_path):
    path = tmp_path / "slim.toml"
    path.write_text('pipeline = "test-subset{keep=3,7},test-noop"\n')
    assert load_pipeline_config(path) == parse_pipeline("test-subset{keep=3,7},test-noop")


def test_toml_values_are_normalised(test_passes):
    pipeline = parse_pipeline_config(
        '[[pass]]\nname = "test-types"\nscale = 2\nints = 5\nlimit = "none"\nmaybe_ratio = "None"\n'
    )
    assert pipeline[0].options == {"scale": 2.0, "ints": (5,), "limit": None, "maybe_ratio": None}


@pytest.mark.parametrize("text", CANONICAL)
def test_to_toml_round_trips(test_passes, text):
    pipeline = parse_pipeline(text)
    toml_text = pipeline.to_toml()
    assert parse_pipeline_config(toml_text) == pipeline
    assert str(parse_pipeline_config(toml_text)) == text


def test_to_toml_layout(test_passes):
    toml_text = parse_pipeline("test-subset{keep=3,7 background=true},test-prune{ratio=0.5}").to_toml()
    assert toml_text == textwrap.dedent(
        """\
        # graphslim pipeline: test-subset{keep=3,7 background=true},test-prune{ratio=0.5}
        [[pass]]
        name = "test-subset"
        keep = [3, 7]
        background = true

        [[pass]]
        name = "test-prune"
        ratio = 0.5
        """
    )


def test_to_toml_falls_back_to_text_when_a_string_is_none(test_passes):
    pipeline = parse_pipeline('test-prune{calib="none"}')
    assert pipeline.to_toml() == '# graphslim pipeline\npipeline = "test-prune{calib=\\"none\\"}"\n'


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("[[pass]\nname = 1", "cannot parse pipeline config '{path}':"),
        ("", "pipeline config '{path}' defines no pipeline"),
        ("passes = []", "pipeline config '{path}' has unknown top-level key(s) passes"),
        ('pipeline = "x"\n[[pass]]\nname = "y"', "pipeline config '{path}' has both"),
        ("pipeline = 3", "'pipeline' in pipeline config '{path}' must be a string"),
        ("pass = 3", "'pass' in pipeline config '{path}' must be an array of tables"),
        ("[[pass]]\nratio = 0.5", "[[pass]] number 1 in pipeline config '{path}' needs a string 'name"),
        ('[[pass]]\nname = "test-noop"\n[[pass]]\nname = "test-prun"',
         "unknown pass 'test-prun' (pass 2 in '{path}'); did you mean 'test-prune'?"),
        ('[[pass]]\nname = "test-prune"\nratoi = 0.5',
         "pass 'test-prune' (pass 1 in '{path}') has no option 'ratoi'; did you mean 'ratio'? Valid options: ratio (float"),
        ('[[pass]]\nname = "test-prune"\nratio = "half"',
         "option 'ratio' of pass 'test-prune' (pass 1 in '{path}') expects a float, got 'half' (str)"),
        ('[[pass]]\nname = "test-types"\nflag = 1',
         "option 'flag' of pass 'test-types' (pass 1 in '{path}') expects a bool"),
        ('[[pass]]\nname = "test-types"\ncount = 1.0',
         "option 'count' of pass 'test-types' (pass 1 in '{path}') expects an int, got 1.0 (float)"),
        ('[[pass]]\nname = "test-subset"',
         "pass 'test-subset' (pass 1 in '{path}') requires option 'keep'"),
        ('pipeline = "test-subset{keep=1"', "in pipeline config '{path}': unbalanced '{{' at column 12"),
        ('pipeline = "test-prune{ratio=x}"', "in pipeline config '{path}': option 'ratio'"),
    ],
)
def test_toml_errors_name_the_file(test_passes, tmp_path, text, fragment):
    path = tmp_path / "slim.toml"
    path.write_text(text)
    with pytest.raises(PipelineError) as err:
        load_pipeline_config(path)
    assert fragment.format(path=path) in str(err.value)


def test_toml_option_errors_keep_their_type(test_passes, tmp_path):
    path = tmp_path / "slim.toml"
    path.write_text('pipeline = "test-prune{ratio=x}"')
    with pytest.raises(OptionError):
        load_pipeline_config(path)


def test_missing_toml_file(tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(PipelineError, match=f"pipeline config '{path}' does not exist"):
        load_pipeline_config(path)


# --------------------------------------------------------------------------------------------------
# Pass manager
# --------------------------------------------------------------------------------------------------


class Recorder(PassInstrument):
    def __init__(self):
        self.events: list[tuple] = []

    def run_before_pipeline(self, pipeline, graph):
        self.events.append(("before_pipeline", str(pipeline)))

    def run_before_pass(self, spec, graph):
        self.events.append(("before", str(spec)))

    def run_after_pass(self, spec, graph, result, seconds):
        assert seconds >= 0
        self.events.append(("after", str(spec), result.changed))

    def run_on_error(self, spec, graph, exc):
        self.events.append(("error", str(spec), type(exc).__name__))

    def run_after_pipeline(self, pipeline, graph, report):
        self.events.append(("after_pipeline", len(report.passes)))


def test_manager_runs_passes_in_order_and_verifies_after_each(test_passes):
    graph = FakeGraph()
    report = PassManager("test-subset{keep=1,2},test-prune{ratio=0.5},test-noop").run(graph)
    assert graph.log == [
        "verify",  # the input graph
        "subset:1,2",
        "verify",
        "prune:0.5",
        "verify",
        "noop",
        "verify",
    ]
    assert report.pipeline == "test-subset{keep=1,2},test-prune{ratio=0.5},test-noop"
    assert [p["name"] for p in report.passes] == ["test-subset", "test-prune", "test-noop"]
    assert [p["text"] for p in report.passes] == ["test-subset{keep=1,2}", "test-prune{ratio=0.5}", "test-noop"]
    assert [p["changed"] for p in report.passes] == [True, True, False]
    assert report.passes[1]["stats"] == {"removed_channels": 12}
    for record in report.passes:
        assert record["seconds"] >= 0 and record["verify_seconds"] >= 0
    assert report.input_verify_seconds >= 0
    assert report.changed
    assert report.seconds >= sum(p["seconds"] for p in report.passes)


def test_manager_passes_defaults_to_the_pass(test_passes):
    graph = FakeGraph()
    PassManager("test-prune").run(graph)
    assert "prune:0.5" in graph.log


def test_manager_without_verification(test_passes):
    graph = FakeGraph()
    graph.broken = True  # would fail if verified
    report = PassManager("test-prune,test-noop", verify=False).run(graph)
    assert graph.verify_calls == 0
    assert [p["verify_seconds"] for p in report.passes] == [None, None]
    assert report.input_verify_seconds is None


def test_manager_accepts_pipeline_objects_and_spec_lists(test_passes):
    pipeline = parse_pipeline("test-prune{ratio=0.25}")
    assert PassManager(pipeline).pipeline == pipeline
    manager = PassManager([PassSpec("test-prune", {"ratio": 1, "keep": [1]})])
    assert str(manager.pipeline) == "test-prune{ratio=1.0 keep=1}"  # normalised
    graph = FakeGraph()
    manager.run(graph)
    assert "prune:1.0" in graph.log


def test_manager_validates_hand_built_specs_before_running(test_passes):
    with pytest.raises(PipelineError, match=r"unknown pass 'test-prun' \(2nd of 2\); did you mean 'test-prune'"):
        PassManager([PassSpec("test-noop"), PassSpec("test-prun")])
    with pytest.raises(OptionError, match=r"pass 'test-prune' \(1st of 1\) has no option 'ratoi'"):
        PassManager([PassSpec("test-prune", {"ratoi": 0.5})])


def test_empty_pipeline_verifies_the_input_only(test_passes):
    graph = FakeGraph()
    report = PassManager("").run(graph)
    assert report.passes == [] and graph.log == ["verify"] and not report.changed


def test_instruments_see_every_pass(test_passes):
    recorder = Recorder()
    PassManager("test-subset{keep=1},test-noop", instruments=[recorder]).run(FakeGraph())
    assert recorder.events == [
        ("before_pipeline", "test-subset{keep=1},test-noop"),
        ("before", "test-subset{keep=1}"),
        ("after", "test-subset{keep=1}", True),
        ("before", "test-noop"),
        ("after", "test-noop", False),
        ("after_pipeline", 2),
    ]


def test_base_instrument_is_a_no_op(test_passes):
    PassManager("test-noop,test-prune", instruments=[PassInstrument()]).run(FakeGraph())


def test_failing_pass_is_named_with_its_position_and_predecessors(test_passes):
    graph = FakeGraph()
    recorder = Recorder()
    manager = PassManager("test-subset{keep=1,2},test-prune{ratio=0.5},test-fail,test-noop", instruments=[recorder])
    with pytest.raises(PipelineError) as err:
        manager.run(graph)
    assert str(err.value) == (
        "pass 'test-fail' (3rd of 4) failed after 'test-subset{keep=1,2}', 'test-prune{ratio=0.5}': "
        "op 'Foo' at node 'foo_1' has no channel rule"
    )
    assert isinstance(err.value.__cause__, PassError)
    assert "noop" not in graph.log  # later passes did not run
    assert err.value.pass_index == 2
    assert [p["name"] for p in err.value.report.passes] == ["test-subset", "test-prune"]
    assert recorder.events[-1] == ("error", "test-fail", "PassError")


def test_first_pass_failure_lists_no_predecessors(test_passes):
    with pytest.raises(PipelineError) as err:
        PassManager("test-fail,test-noop").run(FakeGraph())
    assert str(err.value) == (
        "pass 'test-fail' (1st of 2) failed: op 'Foo' at node 'foo_1' has no channel rule"
    )


def test_unexpected_exception_is_wrapped_with_its_type(test_passes):
    with pytest.raises(PipelineError) as err:
        PassManager("test-noop,test-crash").run(FakeGraph())
    assert str(err.value) == "pass 'test-crash' (2nd of 2) failed after 'test-noop': KeyError: 'missing'"
    assert isinstance(err.value.__cause__, KeyError)


def test_verification_failure_names_the_pass_that_broke_the_graph(test_passes):
    graph = FakeGraph()
    recorder = Recorder()
    with pytest.raises(PipelineError) as err:
        PassManager("test-prune{ratio=0.5},test-break,test-noop", instruments=[recorder]).run(graph)
    assert str(err.value) == (
        "pass 'test-break' (2nd of 3) failed verification after 'test-prune{ratio=0.5}': "
        "node 'conv2d_1' reads missing tensor 'x:0'"
    )
    assert isinstance(err.value.__cause__, VerificationError)
    assert graph.log == ["verify", "prune:0.5", "verify", "break", "verify"]
    assert ("error", "test-break", "VerificationError") in recorder.events
    assert ("after", "test-break", True) not in recorder.events


def test_invalid_input_graph_is_not_blamed_on_a_pass(test_passes):
    graph = FakeGraph()
    graph.broken = True
    with pytest.raises(PipelineError) as err:
        PassManager("test-prune").run(graph)
    assert str(err.value).startswith("the input graph failed verification before any pass ran")
    assert "prune:0.5" not in graph.log
    assert isinstance(err.value.__cause__, VerificationError)


def test_pass_returning_something_else_is_named(test_passes):
    with pytest.raises(PipelineError) as err:
        PassManager("test-noop,test-none").run(FakeGraph())
    message = str(err.value)
    assert message.startswith("pass 'test-none' (2nd of 2) failed after 'test-noop': returned NoneType")
    assert "instead of a PassResult" in message and "returns_none" in message


def test_report_to_dict_is_json_ready(test_passes):
    np = pytest.importorskip("numpy")

    @register_pass("test-numpy")
    def numpy_stats(graph, options):
        return PassResult(True, {"count": np.int64(3), "ratio": np.float32(0.5), "shape": np.zeros(2)})

    report = PassManager("test-subset{keep=1},test-numpy").run(FakeGraph())
    data = json.loads(json.dumps(report.to_dict()))
    assert data["pipeline"] == "test-subset{keep=1},test-numpy"
    assert data["changed"] is True
    assert data["passes"][1]["stats"] == {"count": 3, "ratio": 0.5, "shape": [0.0, 0.0]}
    assert set(data["passes"][0]) == {"name", "text", "seconds", "verify_seconds", "changed", "stats", "warnings"}


@pytest.mark.parametrize(
    "n, text", [(1, "1st"), (2, "2nd"), (3, "3rd"), (4, "4th"), (11, "11th"), (12, "12th"), (13, "13th"), (21, "21st"), (102, "102nd")]
)
def test_ordinals(n, text):
    assert ordinal(n) == text


# --------------------------------------------------------------------------------------------------
# Plugins and built-ins
# --------------------------------------------------------------------------------------------------

PLUGIN = '''
"""A user's pass plugin."""
from __future__ import annotations

from dataclasses import dataclass, field

from graphslim.pipeline import PassResult, register_pass


@dataclass(frozen=True)
class StampOptions:
    label: str = field(default="x", metadata={"help": "what to stamp"})
    times: tuple[int, ...] = ()


@register_pass("test-plugin-stamp", options=StampOptions)
def stamp(graph, opts: StampOptions) -> PassResult:
    """Stamp the graph (plugin test)."""
    graph.log.append(f"stamp:{opts.label}")
    return PassResult(changed=True, stats={"label": opts.label})
'''


def test_plugin_file_registers_passes(tmp_path):
    path = tmp_path / "my_passes.py"
    path.write_text(PLUGIN)
    module = load_plugin(str(path))
    assert get_pass("test-plugin-stamp").help == "Stamp the graph (plugin test)."
    assert load_plugin(path) is module  # idempotent (str or Path)
    pipeline = parse_pipeline('test-plugin-stamp{label="hello world" times=1,2}')
    graph = FakeGraph()
    report = PassManager(pipeline).run(graph)
    assert "stamp:hello world" in graph.log
    assert report.passes[0]["stats"] == {"label": "hello world"}


def test_plugin_module_name(tmp_path, monkeypatch):
    (tmp_path / "graphslim_test_plugin_mod.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        module = load_plugin("graphslim_test_plugin_mod")
        assert module.__name__ == "graphslim_test_plugin_mod"
        assert "test-plugin-stamp" in registered_passes()
    finally:
        sys.modules.pop("graphslim_test_plugin_mod", None)


def test_missing_plugin_file(tmp_path):
    path = tmp_path / "nope.py"
    with pytest.raises(PipelineError, match=f"cannot load plugin '{path}': the file does not exist"):
        load_plugin(str(path))


def test_missing_plugin_module():
    with pytest.raises(PipelineError) as err:
        load_plugin("graphslim_no_such_plugin")
    message = str(err.value)
    assert message.startswith("cannot load plugin 'graphslim_no_such_plugin': ModuleNotFoundError")
    assert "is it installed?" in message
    assert isinstance(err.value.__cause__, ImportError)


def test_broken_plugin_is_named_and_its_passes_rolled_back(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text(PLUGIN + "\nimport graphslim_no_such_dependency\n")
    with pytest.raises(PipelineError) as err:
        load_plugin(str(path))
    message = str(err.value)
    assert f"cannot load plugin '{path}'" in message
    assert "No module named 'graphslim_no_such_dependency'" in message
    assert "test-plugin-stamp" not in REGISTRY
    # fixing the file and loading again works (the failed attempt left nothing behind)
    path.write_text(PLUGIN)
    load_plugin(str(path))
    assert "test-plugin-stamp" in REGISTRY


def test_plugin_with_syntax_error(tmp_path):
    path = tmp_path / "typo.py"
    path.write_text("def broken(:\n")
    with pytest.raises(PipelineError, match=r"cannot load plugin '.*typo.py': SyntaxError"):
        load_plugin(str(path))


def test_plugin_clashing_with_a_registered_pass(tmp_path, test_passes):
    path = tmp_path / "clash.py"
    path.write_text(PLUGIN.replace("test-plugin-stamp", "test-prune"))
    with pytest.raises(PipelineError) as err:
        load_plugin(str(path))
    assert "cannot load plugin" in str(err.value)
    assert "pass 'test-prune' is already registered" in str(err.value)
    assert get_pass("test-prune").options_cls is PruneOptions


def _entry_points_of(*entries):
    def fake(group=None):
        return [e for e in entries if e.group == group]

    return fake


def test_entry_point_plugins(tmp_path, monkeypatch):
    (tmp_path / "graphslim_test_ep_mod.py").write_text(PLUGIN)
    (tmp_path / "graphslim_test_ep_hook.py").write_text(
        "from graphslim.pipeline import PassResult, register_pass\n"
        "def register():\n"
        "    register_pass('test-ep-hook')(lambda graph, options: PassResult(False))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    entries = _entry_points_of(
        importlib.metadata.EntryPoint("stamp", "graphslim_test_ep_mod", "graphslim.passes"),
        importlib.metadata.EntryPoint("hook", "graphslim_test_ep_hook:register", "graphslim.passes"),
        importlib.metadata.EntryPoint("other", "nothing_here", "some.other.group"),
    )
    monkeypatch.setattr(importlib.metadata, "entry_points", entries)
    try:
        assert load_entry_point_plugins() == ["stamp", "hook"]
        assert {"test-plugin-stamp", "test-ep-hook"} <= set(registered_passes())
        assert load_entry_point_plugins() == []  # idempotent
    finally:
        sys.modules.pop("graphslim_test_ep_mod", None)
        sys.modules.pop("graphslim_test_ep_hook", None)


def test_broken_entry_point_is_named(monkeypatch):
    entries = _entry_points_of(
        importlib.metadata.EntryPoint("broken", "graphslim_no_such_ep_module", "graphslim.passes")
    )
    monkeypatch.setattr(importlib.metadata, "entry_points", entries)
    with pytest.raises(PipelineError) as err:
        load_entry_point_plugins()
    message = str(err.value)
    assert message.startswith(
        "cannot load pass plugin 'broken' (entry point 'graphslim_no_such_ep_module' of group "
        "'graphslim.passes'): ModuleNotFoundError"
    )


@pytest.fixture
def pass_package(tmp_path, monkeypatch):
    """A throwaway package of pass modules on sys.path; yields (name, directory)."""
    name = f"graphslim_test_pkg_{abs(hash(str(tmp_path))) % 10**8}"
    package = tmp_path / name
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "stamp.py").write_text(PLUGIN)
    (package / "_helpers.py").write_text("raise RuntimeError('private modules are not imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name, package
    for module in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[module]


def test_load_builtin_passes_imports_every_public_module_once(pass_package):
    name, _ = pass_package
    assert load_builtin_passes(name) == [f"{name}.stamp"]
    assert "test-plugin-stamp" in REGISTRY
    assert load_builtin_passes(name) == []  # idempotent


def test_builtin_module_that_fails_to_import_raises(pass_package):
    name, package = pass_package
    (package / "zbroken.py").write_text("import graphslim_no_such_dependency\n")
    with pytest.raises(PipelineError) as err:
        load_builtin_passes(name)
    assert f"built-in pass module '{name}.zbroken' failed to import" in str(err.value)
    assert "No module named 'graphslim_no_such_dependency'" in str(err.value)
    (package / "zbroken.py").unlink()
    assert load_builtin_passes(name) == [f"{name}.stamp"]  # retry after the fix


def test_missing_builtin_package_is_reported_by_unknown_pass_errors():
    assert load_builtin_passes("graphslim_no_such_package") == []
    with pytest.raises(PipelineError) as err:
        get_pass("test-anything")
    assert "'graphslim_no_such_package' is not importable" in str(err.value)


def test_builtin_passes_are_well_formed():
    """Every pass shipped in graphslim.passes registers with help text and describable options."""
    load_builtin_passes()
    builtins = [i for i in registered_passes().values() if i.fn.__module__.startswith("graphslim.passes.")]
    for info in builtins:
        assert info.help, f"built-in pass '{info.name}' has no docstring/help"
        for option in info.options:
            assert option.describe()
        if not any(o.required for o in info.options):
            assert str(parse_pipeline(info.name)) == info.name
