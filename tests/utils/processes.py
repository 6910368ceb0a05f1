"""Service processes for tests: see recsys.local."""

from recsys.local import (
    REPO_ROOT,
    ServiceProcess,
    free_port,
    health_status,
    project_env,
)

__all__ = ["REPO_ROOT", "ServiceProcess", "free_port", "health_status", "project_env"]
