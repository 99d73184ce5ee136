//! `policy matrix`: the data-flow matrix of a policy set as one self-contained HTML page, for IG boards and DPIAs.
//!
//! For each message kind, a table of senders (rows) by recipients (columns). A cell says `always` when every point of
//! the route's decision space (see `diff`) is permitted, `conditional` when some are (it depends on roles, age,
//! urgency, dates or the family's agreement), and is blank (never) otherwise. Hovering a cell shows the deciding
//! rules, the lawful bases and the fields the recipient may see.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use super::PolicySet;
use super::diff::{Route, decide_point, permitted_routes, points_for, rules_on};
use super::model::KindName;

/// How often a route is permitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Availability {
    Always,
    Conditional,
    Never,
}

/// One cell of the matrix.
#[derive(Clone, Debug)]
pub struct Cell {
    pub availability: Availability,
    pub rule_ids: BTreeSet<String>,
    pub lawful_basis: BTreeSet<String>,
    pub fields: BTreeSet<String>,
}

/// Works out one route's cell.
pub fn cell(set: &PolicySet, route: &Route) -> Cell {
    let rules = rules_on(set, route);
    let points = points_for(&rules);
    let mut permitted = 0;
    let mut cell = Cell {
        availability: Availability::Never,
        rule_ids: BTreeSet::new(),
        lawful_basis: BTreeSet::new(),
        fields: BTreeSet::new(),
    };
    for point in &points {
        let decision = decide_point(set, route, point);
        if decision.permitted {
            permitted += 1;
            cell.rule_ids.extend(decision.rule_ids);
            cell.lawful_basis.extend(decision.lawful_basis);
            cell.fields.extend(decision.fields_shared);
        }
    }
    cell.availability = if permitted == 0 {
        Availability::Never
    } else if permitted == points.len() {
        Availability::Always
    } else {
        Availability::Conditional
    };
    cell
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// Renders the matrix as an HTML page.
pub fn render_html(set: &PolicySet) -> String {
    let routes = permitted_routes(set);
    let kinds: BTreeSet<KindName> = routes.iter().map(|route| route.kind).collect();
    let agencies: Vec<&super::Agency> = set.agencies().collect();
    let mut html = String::new();
    let _ = write!(
        html,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Data-flow matrix</title>\n<style>\
         body{{font-family:system-ui,sans-serif;margin:2em}}table{{border-collapse:collapse;margin-bottom:2em}}\
         th,td{{border:1px solid #999;padding:4px 8px;font-size:13px}}th{{background:#eee}}\
         td.always{{background:#b7e1b0}}td.conditional{{background:#fde9a9}}td.never{{color:#999}}\
         th.row{{text-align:left}}</style></head><body>\n<h1>Data-flow matrix</h1>\n<p>Policy set <code>{}</code>. \
         Rows send, columns receive. <b>always</b>: permitted whatever the facts; <b>conditional</b>: permitted \
         depending on roles, the child's age, urgency, dates or the family's agreement; blank: never. Hover a cell for \
         the rules, lawful bases and fields the recipient sees.</p>\n",
        escape(set.hash())
    );
    for kind in kinds {
        let _ = write!(html, "<h2>{}</h2>\n<table><tr><th>sender \\ recipient</th>", escape(kind.as_str()));
        for recipient in &agencies {
            let _ = write!(html, "<th title=\"{}\">{}</th>", escape(&recipient.name), escape(&recipient.id));
        }
        html.push_str("</tr>\n");
        for sender in &agencies {
            let _ =
                write!(html, "<tr><th class=\"row\" title=\"{}\">{}</th>", escape(&sender.name), escape(&sender.id));
            for recipient in &agencies {
                let route = Route { sender: sender.id.clone(), recipient: recipient.id.clone(), kind };
                if !routes.contains(&route) {
                    html.push_str("<td class=\"never\"></td>");
                    continue;
                }
                let cell = cell(set, &route);
                let (class, label) = match cell.availability {
                    Availability::Always => ("always", "always"),
                    Availability::Conditional => ("conditional", "conditional"),
                    Availability::Never => ("never", ""),
                };
                let title = format!(
                    "rules: {}\nlawful basis: {}\nfields: {}",
                    cell.rule_ids.iter().cloned().collect::<Vec<_>>().join(", "),
                    cell.lawful_basis.iter().cloned().collect::<Vec<_>>().join(", "),
                    cell.fields.iter().cloned().collect::<Vec<_>>().join(", ")
                );
                let _ = write!(html, "<td class=\"{class}\" title=\"{}\">{label}</td>", escape(&title));
            }
            html.push_str("</tr>\n");
        }
        html.push_str("</table>\n");
    }
    html.push_str("</body></html>\n");
    html
}
