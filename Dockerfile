# One image for the Dagster processes of docker-compose.yml: the code server (`code`), the webserver and the
# daemon. Runs execute in the code server's container (default run launcher), next to the specs and data.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    DAGSTER_HOME=/opt/dagster/dagster_home \
    DATIVO_ASSET_SPECS_DIR=/opt/dagster/app/asset_specs

WORKDIR /opt/dagster/app

# Dependencies first, read from pyproject.toml alone, so that a code change does not reinstall them.
# dagster-postgres (same release as dagster) backs the instance's run/event/schedule storage.
COPY pyproject.toml ./
# The pandas extra too: downstream assets in a deployment may take ingested tables as DataFrames.
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['pandas']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt dagster-postgres==0.29.27 \
    && rm /tmp/requirements.txt

COPY dativo_dagster ./dativo_dagster
RUN pip install --no-deps . && rm -rf build ./*.egg-info

# The specs are project data, not part of the package: DATIVO_ASSET_SPECS_DIR points at them, and their
# relative source paths (data/...) resolve against this folder.
COPY asset_specs ./asset_specs
COPY data ./data
COPY deploy/dagster.docker.yaml ${DAGSTER_HOME}/dagster.yaml
COPY deploy/workspace.docker.yaml /opt/dagster/workspace.docker.yaml

# Folders that docker-compose.yml mounts volumes on exist here, owned by the runtime user, so that new volumes
# inherit that ownership: staging between ops, and compute logs under $DAGSTER_HOME/storage.
RUN useradd --uid 1000 --create-home dagster \
    && mkdir -p /opt/dagster/staging ${DAGSTER_HOME}/storage \
    && chown -R dagster:dagster /opt/dagster
USER dagster

EXPOSE 3000 4000
CMD ["dagster", "code-server", "start", "-h", "0.0.0.0", "-p", "4000", "-m", "dativo_dagster.definitions"]
