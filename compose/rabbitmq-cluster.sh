#!/usr/bin/env bash
# A RabbitMQ cluster of several nodes on this one machine, for trying soafarm's failover
# without more machines (the tests start theirs with this script too).
#
#   compose/rabbitmq-cluster.sh up DIR [NODES] [FIRST_PORT]   # default 3 nodes, ports 5701..
#   compose/rabbitmq-cluster.sh stop DIR NODE                 # stop node NODE (1..NODES)
#   compose/rabbitmq-cluster.sh start DIR NODE                # start it again
#   compose/rabbitmq-cluster.sh ctl DIR NODE ARGS...          # rabbitmqctl ARGS on node NODE
#   compose/rabbitmq-cluster.sh down DIR                      # stop every node
#
# Node i listens on 127.0.0.1:FIRST_PORT+i-1 (Erlang distribution on that port + 20000) and
# keeps its data under DIR/node<i>. `up` prints the `;` list of AMQP URLs to give soafarm:
#
#   export SOAFARM_AMQP_URL="$(compose/rabbitmq-cluster.sh up /tmp/rmq)"
#
# Durable sessions' quorum queues and streams are then replicated on every node; a client,
# broker or host whose node stops reconnects to the next URL of the list.
set -euo pipefail

usage() {
    echo "usage: $0 up DIR [NODES] [FIRST_PORT] | stop|start DIR NODE | ctl DIR NODE ARGS... | down DIR" >&2
    exit 2
}

[[ $# -ge 2 ]] || usage
command=$1
dir=$(realpath -m "$2")
bin=/usr/lib/rabbitmq/bin
[[ -x $bin/rabbitmq-server ]] || bin=$(dirname "$(command -v rabbitmq-server)")

node_name() { echo "soafarm-$2-$1@localhost"; }  # node index, first port

# The environment of node $1 (first port $2): its own ports, data, logs and config, and the
# cookie in DIR (HOME) that the nodes and rabbitmqctl share.
node_env() {
    local i=$1 first=$2 port=$(($2 + $1 - 1))
    local base=$dir/node$i
    export HOME=$dir
    export RABBITMQ_NODENAME=$(node_name "$i" "$first")
    export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
    export RABBITMQ_NODE_PORT=$port
    export RABBITMQ_DIST_PORT=$((port + 20000))
    export RABBITMQ_MNESIA_BASE=$base/mnesia
    export RABBITMQ_LOG_BASE=$base/log
    export RABBITMQ_PID_FILE=$base/rabbitmq.pid
    export RABBITMQ_ENABLED_PLUGINS_FILE=$dir/enabled_plugins
    export RABBITMQ_CONF_ENV_FILE=$dir/rabbitmq-env.conf
    export RABBITMQ_CONFIG_FILE=$base/rabbitmq.conf
    export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
}

start_node() {
    local i=$1 first=$2
    (
        node_env "$i" "$first"
        "$bin/rabbitmq-server" -detached
    )
}

ctl() {  # node index, first port, rabbitmqctl arguments...
    local i=$1 first=$2
    shift 2
    (
        node_env "$i" "$first"
        "$bin/rabbitmqctl" -q -n "$RABBITMQ_NODENAME" "$@"
    )
}

case $command in
up)
    nodes=${3:-3}
    first=${4:-5701}
    [[ $nodes -ge 1 ]] || usage
    mkdir -p "$dir"
    echo "$first $nodes" >"$dir/cluster"
    # one cookie for every node and rabbitmqctl: they must share it to form a cluster
    if [[ ! -f $dir/.erlang.cookie ]]; then
        head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$dir/.erlang.cookie"
        chmod 400 "$dir/.erlang.cookie"
    fi
    echo "[]." >"$dir/enabled_plugins"  # no management plugin: its port would clash
    : >"$dir/rabbitmq-env.conf"         # not the system node's NODENAME and ports
    for i in $(seq 1 "$nodes"); do
        mkdir -p "$dir/node$i"
        # the system rabbitmq.conf pins 5672: each node needs a config file of its own
        echo "listeners.tcp.local = 127.0.0.1:$((first + i - 1))" >"$dir/node$i/rabbitmq.conf"
        start_node "$i" "$first"
    done
    for i in $(seq 1 "$nodes"); do
        ctl "$i" "$first" wait "$dir/node$i/rabbitmq.pid" --timeout 120 >/dev/null
    done
    first_node=$(node_name 1 "$first")
    for i in $(seq 2 "$nodes"); do
        ctl "$i" "$first" stop_app >/dev/null
        ctl "$i" "$first" join_cluster "$first_node" >/dev/null
        ctl "$i" "$first" start_app >/dev/null
    done
    urls=()
    for i in $(seq 1 "$nodes"); do
        urls+=("amqp://guest:guest@127.0.0.1:$((first + i - 1))/")
    done
    (IFS=';'; echo "${urls[*]}")
    ;;
start | stop | ctl)
    [[ $# -ge 3 ]] || usage
    [[ -f $dir/cluster ]] || { echo "$dir holds no cluster" >&2; exit 1; }
    read -r first _ <"$dir/cluster"
    i=$3
    shift 3
    case $command in
    start)
        start_node "$i" "$first"
        ctl "$i" "$first" wait "$dir/node$i/rabbitmq.pid" --timeout 120 >/dev/null
        ;;
    stop) ctl "$i" "$first" stop >/dev/null ;;
    ctl) ctl "$i" "$first" "$@" ;;
    esac
    ;;
down)
    [[ -f $dir/cluster ]] || { echo "$dir holds no cluster" >&2; exit 1; }
    read -r first nodes <"$dir/cluster"
    for i in $(seq 1 "$nodes"); do
        ctl "$i" "$first" stop >/dev/null 2>&1 || true
    done
    ;;
*)
    usage
    ;;
esac
