# The project: what every stage deploys. The servers and paths come from the stage
# (config/deploy/bench.rb), which reads the inventory the benchmark writes.
lock "~> 3.17"

set :application, "sensei-bench"
set :branch, "main"
# Sensei's default `keep_releases`.
set :keep_releases, 5
