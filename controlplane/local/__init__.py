"""Running Switchboard on one machine: etcd and Ray on loopback, agents, control plane."""
