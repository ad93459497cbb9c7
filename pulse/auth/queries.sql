-- One-time stream tickets (CONTRACT section 7), run by pulse.auth.tickets.

-- name: insert_tickets
-- The tickets issued together ($1: a JSON array of {hash (hex), subject, tenant_id,
-- roles, token_expires_at}). A ticket lives $2 seconds, and never past the token it
-- was issued for. Issuing also clears tickets that expired unused, so the table
-- stays small.
WITH expired AS (
    DELETE FROM stream_tickets WHERE expires_at < clock_timestamp()
)
INSERT INTO stream_tickets (ticket_hash, subject, tenant_id, roles, token_expires_at, expires_at)
SELECT decode(t.hash, 'hex'), t.subject, t.tenant_id, t.roles, t.token_expires_at,
       least(clock_timestamp() + make_interval(secs => $2), t.token_expires_at)
  FROM jsonb_to_recordset($1::jsonb)
    AS t(hash text, subject text, tenant_id text, roles text[], token_expires_at timestamptz);

-- name: take_tickets
-- Deleting is what makes a ticket single use on every process: of two concurrent
-- redeemers of one ticket, the second waits for the first, then finds it gone (and
-- a ticket named twice in one call is one row, for the caller's first asker).
DELETE FROM stream_tickets
 WHERE ticket_hash = ANY($1::bytea[])
   AND expires_at > clock_timestamp()
RETURNING ticket_hash, subject, tenant_id, roles, token_expires_at, expires_at;

-- name: restore_ticket
-- A ticket taken for a request that was then refused is put back, unspent.
INSERT INTO stream_tickets (ticket_hash, subject, tenant_id, roles, token_expires_at, expires_at)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT DO NOTHING;
