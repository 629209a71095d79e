"""The ``dg`` Component: a ``defs.yaml`` of type ``dativo_dagster.IngestionComponent`` builds a specs folder."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
from pydantic import Field

from dativo_dagster.definitions import build_definitions

EXAMPLE_SPECS_DIR = "asset_specs"
EXAMPLE_SPEC_FILE = "example_people.yaml"
EXAMPLE_DATA_FILE = "data/example_people.csv"

# A spec that materializes on the embedded default (a local warehouse and SQLite catalog under the project's
# .dativo/), with its source path relative to the parent of the specs folder, as every spec's (CONTRACT 1).
EXAMPLE_SPEC = f"""\
# An example asset spec written by `dg scaffold defs dativo_dagster.IngestionComponent`: one YAML file = one
# asset. The format is the project's spec reference; `dg check defs` reports any problem with file and key.
apiVersion: v3.0.2
kind: DataContract
name: example_people
version: "1.0"
status: active
domain: example
dataProduct: scaffold
tenant: example_tenant
description: {{purpose: "A tiny example table written by dg scaffold; replace it with your own specs"}}
team: {{owner: data-team@example.com}}
compliance: {{classification: [internal], retention_days: 30}}

schema:
  - {{name: id, type: integer, required: true}}
  - {{name: name, type: string, required: true}}
  - {{name: joined_on, type: date}}

source:
  type: csv
  files:
    - {{path: {EXAMPLE_DATA_FILE}}}

target:
  write_mode: overwrite
"""

EXAMPLE_COMPONENT_PY = f"""\
import dagster as dg

from dativo_dagster import IngestionComponent


@dg.component_instance
def load(context: dg.ComponentLoadContext) -> IngestionComponent:
    return IngestionComponent(specs_dir="{EXAMPLE_SPECS_DIR}")
"""

EXAMPLE_CSV = "id,name,joined_on\n1,Ada,2024-01-02\n2,Grace,2024-02-03\n3,Linus,\n"


class IngestionScaffolder(dg.Scaffolder):
    """Writes ``defs.yaml`` (``specs_dir: asset_specs``), an example spec and the tiny CSV file it reads."""

    def scaffold(self, request: dg.ScaffoldRequest) -> None:
        """Scaffold the component at ``request.target_path``; existing example files are left as they are.

        ``--format python`` writes a ``component.py`` that returns the component (Dagster's default would
        leave a function without a body).
        """
        if request.scaffold_format == "python":
            Path(request.target_path, "component.py").write_text(EXAMPLE_COMPONENT_PY, encoding="utf-8")
        else:
            dg.scaffold_component(request, {"specs_dir": EXAMPLE_SPECS_DIR})
        if request.append:
            return  # another component in the same defs.yaml: the first one brought the example
        target = Path(request.target_path)
        examples = {f"{EXAMPLE_SPECS_DIR}/{EXAMPLE_SPEC_FILE}": EXAMPLE_SPEC, EXAMPLE_DATA_FILE: EXAMPLE_CSV}
        for relative, text in examples.items():
            path = target / relative
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text, encoding="utf-8")


@dg.scaffold_with(IngestionScaffolder)
class IngestionComponent(dg.Component, dg.Resolvable, dg.Model):
    """Ingests files and database tables into Apache Iceberg tables: one asset per YAML spec in ``specs_dir``.

    Builds the same assets, asset checks, jobs, schedules, sensors and resources as the ``dativo_dagster``
    code location does for that folder. Deployment settings (warehouse, catalog, object storage and their
    credentials) come from the environment variables of the deployment, never from these attributes; with
    none set, the embedded default is a local warehouse and SQLite catalog under the project's ``.dativo/``.
    """

    specs_dir: str = Field(
        description=(
            "Folder of asset specs (*.yaml, *.yml, recursively), relative to the folder of this defs.yaml"
            " (or component.py)."
            " Relative source paths in the specs resolve against this folder's parent."
        ),
    )

    def build_defs(self, context: dg.ComponentLoadContext) -> dg.Definitions:
        """The specs folder's definitions; a broken spec raises ``SpecError`` naming each file and key path."""
        # a defs.yaml's component is loaded at its folder, a component.py's at the file itself
        folder = context.path if context.path.is_dir() else context.path.parent
        return build_definitions(folder / self.specs_dir, project_dir=context.project_root)
