"""Who is asking, and may they: token format, the gate, sites, admins, policy, throttling,
quotas, the refusal log.
"""
