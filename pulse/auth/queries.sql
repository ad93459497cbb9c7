-- One-time stream tickets (CONTRACT section 7), run by pulse.auth.tickets.

-- name: insert_ticket
-- A ticket lives 30 s, and never past the token it was issued for. Issuing
-- also clears tickets that expired unused, so the table stays small.
WITH expired AS (
    DELETE FROM stream_tickets WHERE expires_at < clock_timestamp()
)
INSERT INTO stream_tickets (ticket_hash, subject, tenant_id, roles, token_expires_at, expires_at)
VALUES ($1, $2, $3, $4, $5, least(clock_timestamp() + make_interval(secs => $6), $5));

-- name: take_ticket
-- Deleting is what makes a ticket single use on every process: of two concurrent
-- redeemers of one ticket, the second waits for the first, then finds it gone.
DELETE FROM stream_tickets
 WHERE ticket_hash = $1
   AND expires_at > clock_timestamp()
RETURNING subject, tenant_id, roles, token_expires_at, expires_at;

-- name: restore_ticket
-- A ticket taken for a request that was then refused is put back, unspent.
INSERT INTO stream_tickets (ticket_hash, subject, tenant_id, roles, token_expires_at, expires_at)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT DO NOTHING;
