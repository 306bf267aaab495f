"""What a patch may not touch by default: the path lists behind `patch_safety.Constraints` (each target's
`patch:` settings add to them or, for test-runner configuration, allow some back)."""

from __future__ import annotations

DEFAULT_FORBIDDEN: tuple[str, ...] = (
    # CI config: a patch that edits the pipeline can make the checks that judge it pass.
    ".github/**",
    ".gitlab-ci.yml",
    ".circleci/**",
    ".ci/**",
    "Jenkinsfile",
    "azure-pipelines.yml",
    # Lock files: a dependency swap is a supply-chain change, never a bug fix.
    "*.lock",
    "poetry.lock",
    "package-lock.json",
    "yarn.lock",
    "pnpm-lock.yaml",
    "Cargo.lock",
    "uv.lock",
    "Pipfile.lock",
    "go.sum",
    # Secrets and credentials.
    ".env",
    ".env.*",
    "**/*.pem",
    "**/*.key",
    "**/id_rsa*",
    "**/.npmrc",
    "**/.pypirc",
    # mendloop's own configuration: an agent must not widen its own constraints.
    "mendloop.yaml",
    "**/mendloop*.yaml",
    "**/mendloop*.yml",
    # Submodule URLs make git fetch from wherever the patch says.
    ".gitmodules",
    # Code that runs by itself: git hooks (mendloop reads the repository's own core.hooksPath too, see
    # patch_pipeline.check_patch), pre-commit, attributes naming filter/diff drivers, and Python start-up files.
    ".githooks/**",
    ".husky/**",
    ".pre-commit-config.yaml",
    ".pre-commit-hooks.yaml",
    ".gitattributes",
    "sitecustomize.py",
    "usercustomize.py",
    "*.pth",
)

# How tests are found or run: a patch that changes these can make a test command exit 0 without testing anything.
# Forbidden unless a target's `patch.test_config_allowed` names them. pyproject.toml, setup.cfg and package.json are
# checked by section instead (SECTION_CONFIG): only their test-runner parts are forbidden.
DEFAULT_TEST_CONFIG: tuple[str, ...] = (
    "conftest.py",
    "pytest.ini",
    ".pytest.ini",
    "tox.ini",
    "noxfile.py",
    ".coveragerc",
    "hatch.toml",
    "Makefile",
    "GNUmakefile",
    "*.mk",
    "justfile",
    ".justfile",
)

# File name → the top-level keys (TOML / JSON, dotted) or section names (INI, `*` as a glob) that configure tests.
SECTION_CONFIG: dict[str, tuple[str, ...]] = {
    "pyproject.toml": (
        "tool.pytest",
        "tool.coverage",
        "tool.tox",
        "tool.nox",
        "tool.hatch.envs",
        "tool.pdm.scripts",
        "tool.poe",
        "tool.setuptools.cmdclass",
    ),
    "setup.cfg": ("tool:pytest", "pytest", "coverage:*", "tox", "tox:*", "testenv", "testenv:*", "aliases"),
    "package.json": ("scripts", "jest", "mocha", "ava", "vitest", "nyc", "c8"),
}

DEFAULT_TEST_PATHS: tuple[str, ...] = (
    "tests/**",
    "test/**",
    "**/tests/**",
    "**/test/**",
    "**/__tests__/**",
    "spec/**",
    "**/test_*.py",
    "**/*_test.py",
    "**/*_test.go",
    "**/*.spec.ts",
    "**/*.spec.tsx",
    "**/*.spec.js",
    "**/*.spec.jsx",
    "**/*.test.ts",
    "**/*.test.tsx",
    "**/*.test.js",
    "**/*.test.jsx",
    "**/*_spec.rb",
)
