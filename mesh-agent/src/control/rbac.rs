//! etcd access control for the mesh's keys (`meshctl rbac`): which etcd roles the node
//! agents, the certificate signer and operators get under the prefix, and the idempotent
//! reconciliation of those roles and their users through etcd's auth API.
//!
//! With `--client-cert-auth`, etcd takes a client certificate's common name as the user name,
//! so each node's client certificate names its node and each user here needs no password.
//!
//! | role | may read | may write |
//! |---|---|---|
//! | `mesh-node` | everything under the prefix | `agentinstances/`, `certificaterequests/`, `workloadidentities/` |
//! | `mesh-node.<name>` | | its own node record `nodes/<name>` |
//! | `mesh-signer` | everything under the prefix | `certificaterequests/`, `trustbundles/`, `signer/` |
//! | `mesh-operator` | everything under the prefix | everything under the prefix |
//!
//! A node's credentials can therefore not change policy, the registry's `Agent` entries, the
//! trust bundle or another node's record.

use std::collections::BTreeSet;

use etcd_client::{Permission, PermissionType, RoleRevokePermissionOptions, UserAddOptions};

use super::{ControlError, Etcd, keys};
use crate::{
    identity::resources::{
        CERTIFICATE_REQUESTS_SEGMENT, TRUST_BUNDLES_SEGMENT, WORKLOAD_IDENTITIES_SEGMENT,
    },
    policy::Kind,
};

/// Role shared by every node agent.
pub const NODE_ROLE: &str = "mesh-node";
/// Role of the certificate signer (`mesh-agent ca run`).
pub const SIGNER_ROLE: &str = "mesh-signer";
/// Role of operators (`meshctl apply`, `delete`).
pub const OPERATOR_ROLE: &str = "mesh-operator";
/// etcd's built-in administrator role and user.
const ROOT: &str = "root";
/// Key segment of the signer's replay records.
const SIGNER_SEGMENT: &str = "signer";

/// What a role may do with a key or key range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Access {
    Read,
    ReadWrite,
}

/// One permission: a key, or every key under it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Grant {
    pub key: String,
    pub prefix: bool,
    pub access: Access,
}

/// A role and its complete set of permissions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolePlan {
    pub name: String,
    pub grants: BTreeSet<Grant>,
}

/// A user (a client certificate's common name) and its roles.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserPlan {
    pub name: String,
    pub roles: Vec<String>,
}

/// The roles and users for one mesh prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RbacPlan {
    pub roles: Vec<RolePlan>,
    pub users: Vec<UserPlan>,
}

/// A node and the etcd user its client certificate names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeUser {
    pub node: String,
    pub user: String,
}

impl NodeUser {
    /// `NAME` (the user is the node's name) or `NAME=USER`.
    pub fn parse(text: &str) -> Result<Self, ControlError> {
        let (node, user) = text.split_once('=').unwrap_or((text, text));
        if let Some(problem) = crate::policy::name_problem(node, 253) {
            return Err(ControlError::Usage(format!(
                "--node {text:?}: the node name {problem}"
            )));
        }
        if user.is_empty() || user.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(ControlError::Usage(format!(
                "--node {text:?}: the user must be a non-empty name without spaces"
            )));
        }
        Ok(NodeUser {
            node: node.to_owned(),
            user: user.to_owned(),
        })
    }
}

fn under(prefix: &str, segment: &str, access: Access) -> Grant {
    Grant {
        key: format!("{}/{segment}/", prefix.trim_end_matches('/')),
        prefix: true,
        access,
    }
}

fn everything(prefix: &str, access: Access) -> Grant {
    Grant {
        key: format!("{}/", prefix.trim_end_matches('/')),
        prefix: true,
        access,
    }
}

/// The name of the role that lets one node write its own record.
pub fn node_record_role(node: &str) -> String {
    format!("{NODE_ROLE}.{node}")
}

/// The roles and users for `prefix`.
pub fn plan(
    prefix: &str,
    nodes: &[NodeUser],
    signers: &[String],
    operators: &[String],
) -> RbacPlan {
    let role = |name: &str, grants: Vec<Grant>| RolePlan {
        name: name.to_owned(),
        grants: grants.into_iter().collect(),
    };
    let mut roles = vec![
        role(
            NODE_ROLE,
            vec![
                everything(prefix, Access::Read),
                under(
                    prefix,
                    keys::segment(Kind::AgentInstance),
                    Access::ReadWrite,
                ),
                under(prefix, CERTIFICATE_REQUESTS_SEGMENT, Access::ReadWrite),
                under(prefix, WORKLOAD_IDENTITIES_SEGMENT, Access::ReadWrite),
            ],
        ),
        role(
            SIGNER_ROLE,
            vec![
                everything(prefix, Access::Read),
                under(prefix, CERTIFICATE_REQUESTS_SEGMENT, Access::ReadWrite),
                under(prefix, TRUST_BUNDLES_SEGMENT, Access::ReadWrite),
                under(prefix, SIGNER_SEGMENT, Access::ReadWrite),
            ],
        ),
        role(OPERATOR_ROLE, vec![everything(prefix, Access::ReadWrite)]),
    ];
    let mut users = Vec::new();
    for node in nodes {
        let own = node_record_role(&node.node);
        roles.push(role(
            &own,
            vec![Grant {
                key: keys::node_key(prefix, &node.node),
                prefix: false,
                access: Access::ReadWrite,
            }],
        ));
        users.push(UserPlan {
            name: node.user.clone(),
            roles: vec![NODE_ROLE.to_owned(), own],
        });
    }
    for (names, role) in [(signers, SIGNER_ROLE), (operators, OPERATOR_ROLE)] {
        for name in names {
            users.push(UserPlan {
                name: name.clone(),
                roles: vec![role.to_owned()],
            });
        }
    }
    RbacPlan { roles, users }
}

/// The end of the key range every key starting with `key` falls in (etcd's prefix range).
fn prefix_end(key: &[u8]) -> Vec<u8> {
    let mut end = key.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

impl Grant {
    fn permission(&self) -> Permission {
        let permission = match self.access {
            Access::Read => Permission::read(self.key.as_str()),
            Access::ReadWrite => Permission::read_write(self.key.as_str()),
        };
        if self.prefix {
            permission.with_prefix()
        } else {
            permission
        }
    }

    /// The grant an etcd permission is, if it is one this module makes.
    fn of(permission: &Permission) -> Option<Grant> {
        let access = match permission.get_type() {
            read if read == PermissionType::Read as i32 => Access::Read,
            both if both == PermissionType::Readwrite as i32 => Access::ReadWrite,
            _ => return None,
        };
        let key = String::from_utf8(permission.key().to_vec()).ok()?;
        let prefix = match permission.range_end() {
            [] => permission.is_prefix(),
            end if end == prefix_end(permission.key()).as_slice() => true,
            _ => return None,
        };
        Some(Grant {
            key,
            prefix,
            access,
        })
    }

    fn describe(&self) -> String {
        let access = match self.access {
            Access::Read => "read",
            Access::ReadWrite => "readwrite",
        };
        if self.prefix {
            format!("{access} {}*", self.key)
        } else {
            format!("{access} {}", self.key)
        }
    }
}

/// The plan as text, one line per role permission and per user.
pub fn describe(plan: &RbacPlan) -> String {
    let mut text = String::new();
    for role in &plan.roles {
        for grant in &role.grants {
            text.push_str(&format!("role {}: {}\n", role.name, grant.describe()));
        }
    }
    for user in &plan.users {
        text.push_str(&format!("user {}: {}\n", user.name, user.roles.join(", ")));
    }
    text
}

/// Revokes a role's permission on the range `[key, end)` (`end` empty: the key alone).
async fn revoke(etcd: &Etcd, role: &str, key: Vec<u8>, end: Vec<u8>) -> Result<(), ControlError> {
    let role = role.to_owned();
    etcd.call("revoking an etcd permission", |mut client| async move {
        client
            .role_revoke_permission(
                role,
                key,
                Some(RoleRevokePermissionOptions::new().with_range_end(end)),
            )
            .await
    })
    .await?;
    Ok(())
}

/// Makes etcd's roles and users match `plan`: missing roles, permissions and users are added,
/// and permissions of the plan's roles that the plan does not hold are revoked (a role is
/// exactly what the plan says). Users get the plan's roles added; roles they hold besides are
/// left alone. With `enable`, a `root` user (etcd's administrator, the common name of the
/// operator's administrative certificate) is made if missing and authentication is turned on.
/// Returns one line per change.
pub async fn apply(
    etcd: &Etcd,
    plan: &RbacPlan,
    enable: bool,
) -> Result<Vec<String>, ControlError> {
    let mut changes = Vec::new();
    let existing_roles: BTreeSet<String> = etcd
        .call("listing etcd roles", |mut client| async move {
            client.role_list().await
        })
        .await?
        .roles()
        .iter()
        .cloned()
        .collect();
    for role in &plan.roles {
        let name = role.name.clone();
        let held: BTreeSet<Grant> = if existing_roles.contains(&role.name) {
            let response = etcd
                .call("reading an etcd role", |mut client| async move {
                    client.role_get(name).await
                })
                .await?;
            let mut held = BTreeSet::new();
            for permission in response.permissions() {
                match Grant::of(&permission) {
                    Some(grant) => {
                        held.insert(grant);
                    }
                    None => {
                        revoke(
                            etcd,
                            &role.name,
                            permission.key().to_vec(),
                            permission.range_end().to_vec(),
                        )
                        .await?;
                        changes.push(format!(
                            "role {}: revoked a permission the plan does not hold ({})",
                            role.name,
                            String::from_utf8_lossy(permission.key())
                        ));
                    }
                }
            }
            held
        } else {
            let name = role.name.clone();
            etcd.call("adding an etcd role", |mut client| async move {
                client.role_add(name).await
            })
            .await?;
            changes.push(format!("role {}: created", role.name));
            BTreeSet::new()
        };
        for stale in held.difference(&role.grants) {
            let end = if stale.prefix {
                prefix_end(stale.key.as_bytes())
            } else {
                Vec::new()
            };
            revoke(etcd, &role.name, stale.key.clone().into_bytes(), end).await?;
            changes.push(format!("role {}: revoked {}", role.name, stale.describe()));
        }
        for missing in role.grants.difference(&held) {
            let (name, permission) = (role.name.clone(), missing.permission());
            etcd.call("granting an etcd permission", |mut client| async move {
                client.role_grant_permission(name, permission).await
            })
            .await?;
            changes.push(format!(
                "role {}: granted {}",
                role.name,
                missing.describe()
            ));
        }
    }
    let mut users = plan.users.clone();
    if enable {
        users.push(UserPlan {
            name: ROOT.to_owned(),
            roles: vec![ROOT.to_owned()],
        });
    }
    let existing_users: BTreeSet<String> = etcd
        .call("listing etcd users", |mut client| async move {
            client.user_list().await
        })
        .await?
        .users()
        .iter()
        .cloned()
        .collect();
    for user in &users {
        let held: BTreeSet<String> = if existing_users.contains(&user.name) {
            let name = user.name.clone();
            etcd.call("reading an etcd user", |mut client| async move {
                client.user_get(name).await
            })
            .await?
            .roles()
            .iter()
            .cloned()
            .collect()
        } else {
            let name = user.name.clone();
            etcd.call("adding an etcd user", |mut client| async move {
                client
                    .user_add(name, "", Some(UserAddOptions::new().with_no_pwd()))
                    .await
            })
            .await?;
            changes.push(format!(
                "user {}: created (no password: authenticated by its client certificate)",
                user.name
            ));
            BTreeSet::new()
        };
        for role in user.roles.iter().filter(|role| !held.contains(*role)) {
            let (name, role_name) = (user.name.clone(), role.clone());
            etcd.call("granting an etcd role", |mut client| async move {
                client.user_grant_role(name, role_name).await
            })
            .await?;
            changes.push(format!("user {}: granted role {role}", user.name));
        }
    }
    if enable {
        etcd.call("enabling etcd authentication", |mut client| async move {
            client.auth_enable().await
        })
        .await?;
        changes.push("authentication: enabled".to_owned());
    }
    Ok(changes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_is_the_next_key_after_every_key_with_the_prefix() {
        assert_eq!(prefix_end(b"/mesh/v1/"), b"/mesh/v10".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff"), vec![0]);
    }

    #[test]
    fn nodes_write_only_their_kinds_and_their_own_record() {
        let plan = plan(
            "/mesh/v1",
            &[
                NodeUser::parse("node-a").unwrap(),
                NodeUser::parse("node-b=cn-b").unwrap(),
            ],
            &["signer".to_owned()],
            &["admin".to_owned()],
        );
        let text = describe(&plan);
        let expected = [
            "role mesh-node: read /mesh/v1/*",
            "role mesh-node: readwrite /mesh/v1/agentinstances/*",
            "role mesh-node: readwrite /mesh/v1/certificaterequests/*",
            "role mesh-node: readwrite /mesh/v1/workloadidentities/*",
            "role mesh-node.node-a: readwrite /mesh/v1/nodes/node-a",
            "role mesh-node.node-b: readwrite /mesh/v1/nodes/node-b",
            "role mesh-signer: readwrite /mesh/v1/trustbundles/*",
            "role mesh-signer: readwrite /mesh/v1/signer/*",
            "role mesh-operator: readwrite /mesh/v1/*",
            "user node-a: mesh-node, mesh-node.node-a",
            "user cn-b: mesh-node, mesh-node.node-b",
            "user signer: mesh-signer",
            "user admin: mesh-operator",
        ];
        for line in expected {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        let node = plan
            .roles
            .iter()
            .find(|role| role.name == NODE_ROLE)
            .unwrap();
        assert!(
            !node
                .grants
                .iter()
                .any(|grant| grant.access == Access::ReadWrite
                    && (grant.key.contains("accesspolicies")
                        || grant.key.contains("agents/")
                        || grant.key.contains("trustbundles")
                        || grant.key == "/mesh/v1/")),
            "{text}"
        );
    }

    #[test]
    fn grants_read_back_from_etcd_permissions() {
        for grant in [
            everything("/mesh/v1", Access::Read),
            Grant {
                key: "/mesh/v1/nodes/a".into(),
                prefix: false,
                access: Access::ReadWrite,
            },
        ] {
            assert_eq!(Grant::of(&grant.permission()), Some(grant));
        }
        assert_eq!(Grant::of(&Permission::write("/x")), None);
    }

    #[test]
    fn node_arguments_are_checked() {
        assert_eq!(
            NodeUser::parse("n1").unwrap(),
            NodeUser {
                node: "n1".into(),
                user: "n1".into()
            }
        );
        assert!(NodeUser::parse("Bad_Name").is_err());
        assert!(NodeUser::parse("n1=").is_err());
    }
}
