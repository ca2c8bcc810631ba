# The benchmark's stage: `cap bench deploy` with SENSEI_PEER_INVENTORY naming the JSON file
# the benchmark writes in its temp dir:
#   {"repo_url": "/tmp/.../repo", "deploy_to": "/tmp/.../app", "user": "sensei-deploy",
#    "key": "/tmp/.../id_ed25519", "known_hosts": "/tmp/.../known_hosts",
#    "hosts": [{"host": "127.0.0.1", "port": 10022}, ...]}
# Every server deploys to the same `deploy_to`, as a fleet does; on this one machine each
# sshd sees its own directory there (its own mount namespace).
require "json"

inventory_file = ENV.fetch("SENSEI_PEER_INVENTORY")
inventory = JSON.parse(File.read(inventory_file))

set :repo_url, inventory.fetch("repo_url")
set :deploy_to, inventory.fetch("deploy_to")
# Capistrano's git wrapper goes to tmp_dir (default /tmp, shared by every sshd on this
# machine): keep it per server, as it would be on separate machines.
set :tmp_dir, File.join(inventory.fetch("deploy_to"), ".capistrano-tmp")
# Airbrussh's log file: next to the inventory, not in this directory.
set :format_options, log_file: File.join(File.dirname(inventory_file), "capistrano.log")

set :ssh_options, {
  user: inventory.fetch("user"),
  keys: [inventory.fetch("key")],
  keys_only: true,
  auth_methods: %w[publickey],
  verify_host_key: :always,
  user_known_hosts_file: inventory.fetch("known_hosts"),
  global_known_hosts_file: "/dev/null",
}

inventory.fetch("hosts").each do |h|
  server h.fetch("host"), port: h.fetch("port"), user: inventory.fetch("user"), roles: %w[app]
end
