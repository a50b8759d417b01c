"""One options table (`otcompress.options`): `fuse`'s explicit signature, the
recipe keys, the workflow's pass-through keys, the report and the engine's
AlignOptions all agree with it, so they cannot drift apart."""
import dataclasses
import inspect

from otcompress import align, fusion, options, pipeline, recipes


def test_fuse_signature_matches_the_options_table():
    params = inspect.signature(fusion.fuse).parameters
    keywords = [n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    assert keywords == list(options.FUSE_OPTIONS)
    assert {n: params[n].default for n in keywords} == options.FUSE_DEFAULTS
    assert fusion._OPTIONS == options.FUSE_OPTIONS


def test_derived_views_come_from_the_table():
    assert recipes.RECIPE_KEYS == {o.name: (o.type, o.default) for o in options.OPTIONS if o.recipe}
    assert set(pipeline.FUSE_KEYS) <= set(recipes.RECIPE_KEYS) & set(options.FUSE_OPTIONS)
    assert set(options.REPORTED) <= set(options.FUSE_OPTIONS)
    for o in options.OPTIONS:  # a choice default is one of its choices
        assert not o.choices or o.default is None or o.default in o.choices, o.name
        # (An on/off key's `fuse` keyword is a bool: reconstruct's "on"/"off" are True/False there.)
        fuse_value = {True: "on", False: "off"}.get(o.fuse_value, o.fuse_value) \
            if isinstance(o.fuse_value, bool) and "on" in o.choices else o.fuse_value
        assert not o.choices or fuse_value is None or fuse_value in o.choices, o.name
        assert o.check is None or o.default is None or o.check(o.default), o.name


def test_align_options_defaults_agree_with_the_table():
    for f in dataclasses.fields(align.AlignOptions):
        if f.name in options.BY_NAME:
            assert f.default == options.BY_NAME[f.name].default, f.name


def test_transport_needs_no_yaml():
    import ast
    import pathlib
    tree = ast.parse(pathlib.Path(inspect.getfile(__import__("otcompress.transport").transport)).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names} | \
        {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not imported & {"yaml", "otcompress.recipes"}
    assert "yaml" not in pathlib.Path(options.__file__).read_text()


def test_fuse_flags_are_generated_from_the_recipe_keys():
    from otcompress.cli import cli
    params = {p.name: p for p in cli.commands["fuse"].params}
    assert set(options.RECIPE_KEYS) - set(params) == {"distill_alpha"}  # declared without a flag
    for o in options.OPTIONS:
        if o.cli_flags:
            assert params[o.name].opts[0] == o.cli_flags[0], o.name
            assert o.help in (params[o.name].help or ""), o.name


def test_fuse_options_type_has_fuses_defaults():
    o = options.FuseOptions()
    assert {f.name: getattr(o, f.name) for f in dataclasses.fields(o)} == options.FUSE_DEFAULTS
