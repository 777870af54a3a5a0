# Consul agent configuration for the platform's docker-compose.
#
# One Consul server that is its own cluster: enough for development, demos and
# CI, not a production layout (run 3 or 5 servers there). docker-compose mounts
# this directory at /consul/config; with the container command `agent`, the
# hashicorp/consul image runs
#   consul agent -data-dir=/consul/data -config-dir=/consul/config
# Unlike `consul agent -dev`, the state lives in data_dir: services registered
# over the HTTP API survive a restart of the container (keep /consul/data on a
# volume). See consul/README.md.

datacenter = "dc1"
node_name  = "consul-1"
data_dir   = "/consul/data"
log_level  = "INFO"

# A single server that elects itself leader at once.
server           = true
bootstrap_expect = 1

# The HTTP API (8500), the UI and DNS (8600) listen on every interface, so the
# gateway and the services in other containers reach it as consul:8500 and the
# host reaches it through the published port. Do not publish 8500 beyond the
# host while ACLs are off.
client_addr = "0.0.0.0"

# The cluster-internal (serf/raft) address: the container's own interface.
bind_addr = "{{ GetInterfaceIP \"eth0\" }}"

ui_config {
  enabled = true # http://localhost:8500/ui
}

ports {
  http = 8500
  dns  = 8600
}

# Registrations come over the HTTP API: never let them run scripts.
enable_script_checks       = false
enable_local_script_checks = false

disable_update_check = true

# Consul's own metrics in Prometheus format at /v1/agent/metrics?format=prometheus
# (the endpoint is off unless a retention time is set).
telemetry {
  prometheus_retention_time = "60s"
  disable_hostname          = true
}

# ACLs are off by default so `docker compose up` needs no token. To turn them on:
#   1. set enabled = true below and restart the container;
#   2. docker compose exec consul consul acl bootstrap   (prints the management token:
#      keep it safe);
#   3. create tokens (policies in consul/README.md): the gateway needs
#      service:read + node:read, each service service:write on its own name;
#   4. give each process its token in CONSUL_HTTP_TOKEN.
# With default_policy "deny", a process without a token sees no services at all
# (the gateway logs a warning naming CONSUL_HTTP_TOKEN).
acl {
  enabled                  = false
  default_policy           = "deny"
  enable_token_persistence = true
}
