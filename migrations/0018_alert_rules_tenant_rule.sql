-- The rules list pages by rule_id within a tenant (fleet queries: list_rules): an
-- index on (tenant_id, rule_id) reads a page as one range, in order, where the
-- index on tenant_id alone read the tenant's every rule and sorted them for each
-- page. It serves every lookup by tenant the old one did (rule evaluation at
-- ingest among them), so the old one goes.
CREATE INDEX alert_rules_tenant_rule ON alert_rules (tenant_id, rule_id);
DROP INDEX alert_rules_tenant;
