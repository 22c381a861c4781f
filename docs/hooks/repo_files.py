"""MkDocs hook: files of the repository outside docs/ that the site serves as they are.

``contract/asyncapi.json`` is generated from the wire contract and kept in the repository; the site
serves that very file (no copy in docs/), so a page can link to it as ``contract/asyncapi.json``.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files

# repository path -> path in the site (relative to docs/)
SERVED = {"contract/asyncapi.json": "contract/asyncapi.json"}


def on_files(files: Files, config: MkDocsConfig) -> Files:
    root = Path(config.config_file_path).resolve().parent
    for source, dest in SERVED.items():
        path = root / source
        if not path.is_file():
            raise PluginError(f"repo_files: {path} is missing")
        files.append(File.generated(config, dest, abs_src_path=str(path)))
    return files
