# Sourced by the image scripts: picks the container engine (docker where present, else podman) and,
# for podman, points CONTAINERS_CONF at a file of the project's own: runtime runc (crun refuses a
# hybrid cgroup layout) and default ulimits no higher than this host's hard limits (podman's
# defaults ask for more than some VMs allow, and every container then fails to start).
ENGINE=${ENGINE:-$(docker info >/dev/null 2>&1 && echo docker || echo podman)}
if [ "$ENGINE" = podman ] && [ -z "${CONTAINERS_CONF:-}" ]; then
    mkdir -p build/podman
    nofile=$(ulimit -Hn)
    [ "$nofile" = unlimited ] && nofile=1048576
    nproc=$(ulimit -Hu)
    pid_max=$(cat /proc/sys/kernel/pid_max)
    if [ "$nproc" = unlimited ] || [ "$nproc" -gt "$pid_max" ]; then nproc=$pid_max; fi
    cat > build/podman/containers.conf <<CONF
# Written by scripts/podman-env.sh from this host's limits; see docs/images.md.
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]

[engine]
runtime = "runc"
CONF
    export CONTAINERS_CONF=$PWD/build/podman/containers.conf
fi
export ENGINE
