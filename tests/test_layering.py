"""Imports point one way: programs (train.py, generate.py, ...) -> library (training/, metrics/)
-> torch_utils/, dnnlib/. Read from the source with ast, nothing is imported. Also: bench/ and
tools/ import no program and no test module, test modules import no other test module (the
shared helpers are in tests/helpers.py and tests/conftest.py), and pyproject.toml installs
exactly these programs and packages."""

import ast
import glob
import os
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROGRAMS = {'train', 'generate', 'fid', 'dataset_tool', 'train_discriminator'} # the top-level .py files
LIBRARY = ['training', 'sampling', 'metrics', 'torch_utils', 'dnnlib']
SCRIPTS = ['bench', 'tools'] # programs too, kept in folders; they call the library
NOT_FOR_LIBRARY = PROGRAMS | {'click', 'tests', *SCRIPTS}
NOT_FOR_SCRIPTS = PROGRAMS | {'tests'}

def python_files(*folders):
    return sorted(path for folder in folders for path in glob.glob(os.path.join(ROOT, folder, '**', '*.py'), recursive=True))

def imported_names(tree):
    """(line, dotted module name) of every import in tree, at any depth, including importlib.import_module('x')
    and __import__('x'); relative imports (within a package) are left out."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found += [(node.lineno, node.module)]
            found += [(node.lineno, f'{node.module}.{alias.name}') for alias in node.names] # from tests import test_x
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, 'id', None)
            if name in ('import_module', '__import__'):
                found.append((node.lineno, node.args[0].value))
    return found

def embedded_programs(tree):
    """Source strings that are Python programs with imports (workers started with python -c or
    written to a file), parsed: they run from the same checkout and follow the same rules."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and 'import ' in node.value:
            try:
                yield node.lineno, ast.parse(node.value)
            except SyntaxError:
                continue

def imports(path):
    """(line, dotted name) of the imports of a file and of the Python source strings in it."""
    tree = ast.parse(open(path, encoding='utf-8').read(), filename=path)
    found = imported_names(tree)
    for line, program in embedded_programs(tree):
        found += [(line, name) for _, name in imported_names(program)]
    return found

def violations(paths, forbidden):
    """'file:line imports name' for each import whose top-level name is forbidden."""
    return [f'{os.path.relpath(path, ROOT)}:{line} imports {name}' for path in paths
            for line, name in imports(path) if name.split('.')[0] in forbidden]

#----------------------------------------------------------------------------

def test_library_imports_no_program_click_or_tests():
    paths = python_files(*LIBRARY)
    assert len(paths) > 20 # the folders were found
    assert violations(paths, NOT_FOR_LIBRARY) == []

def test_bench_and_tools_import_no_program_or_tests():
    paths = python_files(*SCRIPTS)
    assert len(paths) > 10
    assert violations(paths, NOT_FOR_SCRIPTS) == []

def test_test_modules_import_no_other_test_module():
    found = []
    for path in python_files('tests'):
        for line, name in imports(path):
            parts = name.split('.')
            if parts[0].startswith('test_') or (parts[0] == 'tests' and len(parts) > 1 and parts[1].startswith('test_')):
                found.append(f'{os.path.relpath(path, ROOT)}:{line} imports {name}')
    assert found == []

def test_programs_and_packages_are_the_ones_installed():
    top_level = {os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(ROOT, '*.py'))}
    assert top_level == PROGRAMS # a new top-level module is a program (or belongs in a package)
    with open(os.path.join(ROOT, 'pyproject.toml'), 'rb') as f:
        setuptools = tomllib.load(f)['tool']['setuptools']
    assert set(setuptools['py-modules']) == PROGRAMS
    packages = {os.path.basename(os.path.dirname(p)) for p in glob.glob(os.path.join(ROOT, '*', '__init__.py'))}
    assert set(setuptools['packages']) == packages - {'tests'} == set(LIBRARY + SCRIPTS)

@pytest.mark.parametrize('source, found', [
    ('import fid', ['fid']),
    ('from fid import calculate_fid_from_inception_stats', ['fid', 'fid.calculate_fid_from_inception_stats']),
    ('def f():\n    import click', ['click']),
    ('import importlib\nimportlib.import_module("generate")', ['importlib', 'generate']),
    ('from . import sampling', []),
    ('CODE = """\nfrom tests.test_train import run\n"""', ['tests.test_train', 'tests.test_train.run']),
])
def test_every_kind_of_import_is_seen(tmp_path, source, found):
    path = tmp_path / 'module.py'
    path.write_text(source)
    assert [name for _, name in imports(str(path))] == found
