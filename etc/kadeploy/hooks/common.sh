# Shared by the scheduler hooks: sourced, not run.
#
# The scheduler runs its hooks as its own user (SlurmUser, oar) through sudo, with a
# rule for these scripts only, e.g. in /etc/sudoers.d/kabin:
#   slurm ALL=(root) NOPASSWD: /etc/kadeploy/hooks/slurm-prolog, /etc/kadeploy/hooks/slurm-epilog
#   oar   ALL=(root) NOPASSWD: /etc/kadeploy/hooks/oar-prologue, /etc/kadeploy/hooks/oar-epilogue
# A hook is the administrator's own act: it forgets who called sudo (kabin takes
# SUDO_USER as the requesting user, and only root without it may grant rights).
unset SUDO_USER
# The environment the nodes go back to when a job ends (empty: only revoke the rights).
reference_env=${KABIN_REFERENCE_ENV-debian12}

grant() {      # USER NODESET
    ka-rights add -u "$1" -m "$2" -q
}

revoke() {     # USER NODESET: the rights go first, then the nodes are redeployed
    ka-rights delete -u "$1" -m "$2" -q
    [ -z "$reference_env" ] && return 0
    kadeploy -e "$reference_env" -m "$2" --force -q --format json > /dev/null
}
