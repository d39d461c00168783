"""Who is granted what, and on what, by deploy/<cloud>: the Terraform's role bindings read statically (google and
azurerm cannot be downloaded here, so no plan), the role and policy files they name, and deploy/bucket-prefixes.yaml.

- ``Deployment(cloud)``: one cloud's ``main.tf`` and role files, as ``bindings`` (role, identities, scope);
  ``granted(identity)`` is every permission one identity holds, in all.
- ``scope_violations()``: the bindings wider than the cloud allows. GCP: nothing on the project but a role of
  ``aiplatform.*`` permissions alone (Vertex AI takes IAM policies on none of the resources the pipeline creates),
  ``iam.serviceAccounts.actAs`` only on the training and serving accounts, predefined roles only for Google's own
  service agents. Azure: nothing on the resource group or above but a role of ``Microsoft.Insights`` actions alone
  (autoscale settings and alert rules are resources of the group), no action that lists keys, built-in roles only
  for Event Grid's identity. AWS: no ``"Resource": "*"`` but for actions that have no resource-level permissions, no
  AWS-managed policy attached.

The files are ``terraform fmt``-ed (test_deploy_manifests checks it), so a block starts with ``resource "T" "N" {`` and
ends with a ``}`` alone at the start of a line, and its attributes are indented by two spaces.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
PREFIXES = yaml.safe_load((DEPLOY / "bucket-prefixes.yaml").read_text())
JOBS = ("training", "serving")
# Actions the Service Authorization Reference lists with no resource type: only "Resource": "*" grants them
AWS_WITHOUT_RESOURCES = {"ecr:GetAuthorizationToken", "cloudwatch:PutMetricData", "application-autoscaling:DescribeScalableTargets",
                         "ec2:DescribeNetworkInterfaces", "ec2:DescribeVpcs", "ec2:DescribeDhcpOptions", "ec2:DescribeSubnets",
                         "ec2:DescribeSecurityGroups"}


def manifest(cloud: str) -> dict:
    """deploy/<cloud>/permissions.*: identity -> the part that calls -> the call -> the permission(s) it needs."""
    path = next((DEPLOY / cloud).glob("permissions.*"))
    return (json.loads if path.suffix == ".json" else yaml.safe_load)(path.read_text())


def documented(cloud: str, identity: str) -> set[str]:
    """Every permission the manifest lists for ``identity``."""
    found: set[str] = set()
    for part in manifest(cloud)[identity].values():
        for value in part.values():
            found |= set(value if isinstance(value, list) else [value])
    return found


@dataclass(frozen=True)
class Binding:
    resource: str  # type.name, for messages
    role: str  # a role file's stem (its permissions in Deployment.roles), or a predefined role's name
    identities: tuple[str, ...]  # airflow, training, serving; or the expression of anyone else (a service agent)
    scopes: tuple[str, ...]  # the expressions of what it is bound on
    kind: str  # gcp: project, storage_bucket, service_account, ...; azure: role_assignment; aws: role_policy, policy
    condition: str  # its IAM / ABAC condition, as written ("" for none)


def blocks(text: str) -> dict[str, str]:
    """The resource blocks of a formatted .tf file: "type.name" -> body."""
    return {f"{m[1]}.{m[2]}": m[3] for m in re.finditer(r'^resource "(\w+)" "(\w+)" \{\n(.*?)^\}', text, re.S | re.M)}


def attribute(body: str, name: str) -> str:
    """A top-level attribute's expression, a heredoc's text, or a nested block's (condition { expression = ... })."""
    heredoc = re.search(rf"^  {name}\s+= <<-EOT\n(.*?)^\s*EOT$", body, re.S | re.M)
    if heredoc:
        return heredoc[1]
    found = re.search(rf"^ {{2,4}}{name}\s+= (.+)$", body, re.M)
    return found[1].strip() if found else ""


def for_each(body: str, text: str) -> dict[str, str]:
    """The keys -> values of a block's for_each: an inline map, a toset([...]) or another resource's for_each."""
    inline = re.search(r"^  for_each\s+= \{\n(.*?)^  \}", body, re.S | re.M)
    if inline:
        return dict(re.findall(r"^\s+([\w-]+)\s+= (.+)$", inline[1], re.M))
    expression = attribute(body, "for_each")
    if expression.startswith("{"):
        return dict(re.findall(r'([\w-]+)\s*=\s*("[^"]*"|[\w.\[\]"]+)', expression))
    if expression.startswith("toset("):
        return {k: k for k in re.findall(r'"([\w-]+)"', expression)}
    if expression:  # another resource: the same keys
        return for_each(blocks(text)[expression], text)
    return {}


class Deployment:
    def __init__(self, cloud: str, main_tf: str | None = None, roles: dict[str, dict] | None = None):
        self.cloud = cloud
        self.text = main_tf if main_tf is not None else (DEPLOY / cloud / "terraform" / "main.tf").read_text()
        pattern = {"aws": "*-policy.json", "gcp": "*-role.yaml", "azure": "*-role.json"}[cloud]
        loaded = {path.stem.removesuffix("-role"): (json.loads if path.suffix == ".json" else yaml.safe_load)(path.read_text())
                  for path in (DEPLOY / cloud).glob(pattern) if path.stem != "trust-policy"}  # (who may assume a role)
        self.roles = {**loaded, **(roles or {})}
        self.bindings = list(getattr(self, f"_{cloud}_bindings")())

    def permissions(self, role: str) -> set[str]:
        doc = self.roles.get(role)
        if doc is None:
            return {role}  # a predefined role: what it holds is not ours to list
        if self.cloud == "gcp":
            return set(doc["includedPermissions"])
        if self.cloud == "azure":
            return set(doc["Actions"]) | set(doc["DataActions"])
        return {a for s in doc["Statement"] if s["Effect"] == "Allow" for a in ([s["Action"]] if isinstance(s["Action"], str)
                                                                                 else s["Action"])}

    def granted(self, identity: str) -> set[str]:
        return set().union(*(self.permissions(b.role) for b in self.bindings if identity in b.identities))

    # -- reading each cloud's bindings -------------------------------------------------------------------
    def _identities(self, body: str, expression: str, named: dict[str, str]) -> tuple[str, ...]:
        """Who ``expression`` is: the keys of a for_each over identities (``each.value.member``), a named one, or
        the expression itself (someone else's, a service agent's)."""
        if expression.startswith("each.value."):
            return tuple(for_each(body, self.text))
        return (named.get(expression, expression),)

    def _scopes(self, body: str, expression: str) -> tuple[str, ...]:
        """What ``expression`` binds on: the values of a for_each map (``each.value``), ``<resource>[key]`` for each
        key of a for_each over resources (``each.value.name``), or the expression itself."""
        if expression == "each.value":
            return tuple(for_each(body, self.text).values())
        if expression.startswith("each.value."):
            return tuple(f"{attribute(body, 'for_each')}[{key}]" for key in for_each(body, self.text))
        return (expression,)

    def _gcp_bindings(self):
        for resource, body in blocks(self.text).items():
            kind = re.fullmatch(r"google_(\w+)_iam_(?:member|binding|policy)\.\w+", resource)
            if not kind:
                continue
            role = attribute(body, "role")
            custom = re.search(r'mlfactory\["([\w-]+)"\]', role)
            member = attribute(body, "member")
            named = re.fullmatch(r"google_service_account\.(\w+)\.member", member)
            identities = (named[1],) if named else self._identities(body, member, {})
            target = next((attribute(body, a) for a in ("project", "bucket", "subscription", "topic", "service_account_id")
                           if attribute(body, a)), "")
            yield Binding(resource, custom[1] if custom else role.strip('"'), identities, self._scopes(body, target),
                          kind[1], attribute(body, "expression"))

    def _azure_bindings(self):
        for resource, body in blocks(self.text).items():
            if not resource.startswith("azurerm_role_assignment."):
                continue
            custom = re.search(r'mlfactory\["([\w-]+)"\]', attribute(body, "role_definition_id"))
            role = custom[1] if custom else attribute(body, "role_definition_name").strip('"')
            identities = self._identities(body, attribute(body, "principal_id"), {"var.airflow_principal_id": "airflow"})
            yield Binding(resource, role, identities, self._scopes(body, attribute(body, "scope")), "role_assignment",
                          attribute(body, "condition"))

    def _aws_bindings(self):
        for resource, body in blocks(self.text).items():
            if not resource.startswith(("aws_iam_policy.", "aws_iam_role_policy.", "aws_iam_role_policy_attachment.")):
                continue
            policy = attribute(body, "policy") or attribute(body, "policy_arn")
            roles = tuple(for_each(body, self.text)) or ("airflow",)  # the one policy not on a role is Airflow's
            for identity in roles:
                name = re.search(r'local\.policies\["([^"]+)"\]', policy.replace("${each.key}", identity))
                yield Binding(resource, name[1] if name else policy, (identity,), (), resource.split(".")[0], "")

    # -- the checks ----------------------------------------------------------------------------------------
    def scope_violations(self) -> list[str]:
        return [f"{b.resource}: {problem}" for b in self.bindings for problem in getattr(self, f"_{self.cloud}_scope")(b)] + (
            self._aws_wildcards() if self.cloud == "aws" else [])

    def _gcp_scope(self, b: Binding):
        permissions = self.permissions(b.role)
        ours = set(b.identities) & {"airflow", *JOBS}
        if b.kind in ("project", "folder", "organization") and not (
                b.role in self.roles and all(p.startswith("aiplatform.") for p in permissions)):
            yield f"{b.role} is bound on the {b.kind}: only a role of aiplatform.* permissions alone may be"
        if "iam.serviceAccounts.actAs" in permissions and not (
                b.kind == "service_account" and set(b.scopes) <= {f"google_service_account.jobs[{job}]" for job in JOBS}):
            yield f"{b.role} grants iam.serviceAccounts.actAs on {b.kind} {b.scopes}, not on the jobs' service accounts alone"
        if ours and b.role not in self.roles:
            yield f"predefined role {b.role} for {sorted(ours)}: grant a custom role of the calls' permissions"

    def _azure_scope(self, b: Binding):
        permissions = self.permissions(b.role)
        for scope in b.scopes:
            if re.search(r"resource_group|subscription", scope) and not scope.startswith("azurerm_") and not (
                    b.role in self.roles and all(p.startswith("Microsoft.Insights/") for p in permissions)):
                yield f"{b.role} is assigned on {scope}: only a role of Microsoft.Insights actions alone may be"
        if any(p.lower().endswith("/listkeys/action") for p in permissions):
            yield f"{b.role} can list keys"
        if set(b.identities) & {"airflow", *JOBS} and b.role not in self.roles:
            yield f"built-in role {b.role} for {b.identities}: assign a custom role of the calls' actions"

    def _aws_scope(self, b: Binding):
        if "arn:aws:iam::aws:policy/" in b.role:
            yield f"an AWS-managed policy ({b.role}) grants more than the calls need"
        if b.role not in self.roles:
            yield f"{b.role} is not a policy file of deploy/aws"

    def _aws_wildcards(self) -> list[str]:
        found = []
        for name, doc in self.roles.items():
            for s in doc["Statement"]:
                actions = {s["Action"]} if isinstance(s["Action"], str) else set(s["Action"])
                resources = {s.get("Resource", "*")} if isinstance(s.get("Resource", "*"), str) else set(s["Resource"])
                if s["Effect"] == "Allow" and "*" in resources and actions - AWS_WITHOUT_RESOURCES:
                    found.append(f"{name}.json {s.get('Sid')}: Resource * for {sorted(actions - AWS_WITHOUT_RESOURCES)}, "
                                 "which take resource-level permissions")
        return found
