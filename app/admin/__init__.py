"""What an admin reads and acts on: the intake log, studies, daily figures, the queue and the
quarantine.
"""
