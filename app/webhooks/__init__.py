"""Study-arrived webhooks: noticing settled studies, signed deliveries, an admin's view of them."""
